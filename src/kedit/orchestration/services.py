"""The shared control plane on real servers, on one machine: PostgreSQL (the Prefect server's and the
MLflow server's database, and the lineage lock), an S3-compatible object store (MLflow's artifacts and
the DVC remote), an MLflow tracking server that proxies artifacts (clients never see the store's
paths or credentials) and a bare git repository (the lineage repository every workspace pushes to).

The same topology as ``infra/docker-compose.yml``, started as child processes instead of containers:
the executable form of it (``tests/test_shared_stack.py``). PostgreSQL is Debian's ``postgresql``
(``initdb`` + ``pg_ctl`` into a folder of our own, as the ``postgres`` account when run as root: the
server refuses root), the S3 store is ``moto`` in server mode; the clients speak plain S3, so MinIO or
AWS work unchanged. Nothing here imports Prefect.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kedit.orchestration.stack import free_port

DATABASES = ("prefect", "mlflow", "kedit")  # one cluster, one database per service and one for the lock
BUCKETS = ("mlflow", "kedit-dvc")


class ServiceError(RuntimeError):
    """A shared service could not be started or reached; the message names it."""


def _venv_bin(name: str) -> str | None:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else shutil.which(name)


def pg_bindir() -> Path | None:
    """The folder holding Debian's ``initdb`` / ``pg_ctl`` (``/usr/lib/postgresql/<major>/bin``), else PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def missing_tools() -> list[str]:
    """What this machine lacks to start the shared services (empty: everything is there)."""
    missing = []
    if pg_bindir() is None:
        missing.append("PostgreSQL server binaries (initdb, pg_ctl: Debian package `postgresql`)")
    for name, pkg in (("moto_server", "moto[server]"), ("mlflow", "mlflow")):
        if _venv_bin(name) is None:
            missing.append(f"`{name}` (pip package {pkg})")
    for mod, pkg in (("psycopg2", "psycopg2-binary"), ("boto3", "boto3"), ("dvc_s3", "dvc-s3")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(f"Python module {mod} (pip package {pkg})")
    if shutil.which("git") is None:
        missing.append("git")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        missing.append("runuser (util-linux): PostgreSQL refuses to run as root")
    return missing


def _wait(what: str, ok, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} while starting; log {log}:\n"
                               f"{_tail(log)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} not ready after {timeout:.0f} s; log {log}:\n{_tail(log)}")
        time.sleep(0.5)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def http_ok(url: str, timeout: float = 3) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


@dataclass
class Postgres:
    """A PostgreSQL cluster of our own on 127.0.0.1:``port`` (password auth over TCP).

    Run as root, the cluster belongs to the ``postgres`` account (the server refuses to run as root), so
    its folder is a fresh one under the system temp dir, which that account can reach."""

    home: Path
    port: int = 0
    user: str = "kedit"
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        bindir = pg_bindir()
        if bindir is None:
            raise ServiceError("PostgreSQL: no initdb / pg_ctl on this machine (install Debian's `postgresql`)")
        self.bindir = bindir
        self.as_user = "postgres" if os.geteuid() == 0 else None

    def _run(self, args: list[str], timeout: float = 120) -> str:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise ServiceError(f"PostgreSQL: {' '.join(args[:2])} failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-2000:]}")
        return r.stdout

    def start(self) -> None:
        if self.as_user:
            self.data_dir = Path(tempfile.mkdtemp(prefix="kedit-pg-"))
            pw = pwd.getpwnam(self.as_user)
            os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
        else:
            self.data_dir = Path(self.home) / "postgres"
            self.data_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.data_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            pw = pwd.getpwnam(self.as_user)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pgdata = self.data_dir / "data"
        self._run(["initdb", "-D", str(pgdata), "-U", self.user, f"--pwfile={pwfile}", "--auth-local=trust",
                   "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"])
        pwfile.unlink()
        opts = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(["pg_ctl", "-D", str(pgdata), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start"])
        for db in DATABASES:
            self.sql(f'CREATE DATABASE "{db}"', db="postgres")

    @property
    def log(self) -> Path:
        return (self.data_dir or Path(self.home)) / "postgres.log"

    def url(self, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def sql(self, statement: str, db: str = "kedit") -> None:
        import psycopg2

        con = psycopg2.connect(self.url(db), connect_timeout=10)
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(statement)
        finally:
            con.close()

    def running(self) -> bool:
        if self.data_dir is None:
            return False
        r = subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                           capture_output=True)
        return r.returncode == 0

    def stop(self, remove: bool = True) -> None:
        """Stop the server; ``remove``: also delete the cluster's folder when it lives outside ``home``."""
        if self.data_dir is None:
            return
        if (self.data_dir / "data" / "postmaster.pid").exists():
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
                self._run(["pg_ctl", "-D", str(self.data_dir / "data"), "-m", "fast", "-w", "stop"], timeout=60)
        if self.as_user and remove:
            with contextlib.suppress(OSError):
                shutil.copy2(self.log, Path(self.home) / "postgres.log")
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None


@dataclass
class SharedServices:
    """PostgreSQL, an S3 store, an MLflow server (PostgreSQL + S3, artifact proxy) and a bare git
    repository on 127.0.0.1, everything under ``home``; :meth:`worker_env` is what a worker (or a
    second machine) needs to use them. Stop with :meth:`stop` (or use as a context manager)."""

    home: Path
    s3_port: int = 0
    mlflow_port: int = 0
    s3_key: str = "kedit"
    s3_secret: str = field(default_factory=lambda: secrets.token_hex(12))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.s3_port = self.s3_port or free_port()
        self.mlflow_port = self.mlflow_port or free_port()
        self.pg = Postgres(self.home)

    # --- addresses -----------------------------------------------------------------------------------
    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def git_remote(self) -> Path:
        return self.home / "lineage.git"

    @property
    def dvc_remote(self) -> str:
        return "s3://kedit-dvc/kedit"

    @property
    def prefect_db_url(self) -> str:
        return self.pg.url("prefect", "postgresql+asyncpg")

    @property
    def lock_url(self) -> str:
        return self.pg.url("kedit")

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.s3_key, "AWS_SECRET_ACCESS_KEY": self.s3_secret,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.s3_url,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_url}

    def worker_env(self) -> dict[str, str]:
        """Settings a worker needs (infra/README.md, "Settings every worker needs"), plus the lineage
        lock's database and the lineage git remote. MLflow artifacts need no S3 settings (the server
        proxies them); DVC does."""
        return {**self.s3_env(), "MLFLOW_TRACKING_URI": self.mlflow_url, "KEDIT_LOCK_URL": self.lock_url,
                "KEDIT_GIT_REMOTE": str(self.git_remote), "KEDIT_DVC_REMOTE": self.dvc_remote,
                "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}

    # --- start / stop ----------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / f"{name}.log", "ab")
        p = subprocess.Popen(args, cwd=self.home, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def start_postgres(self) -> None:
        self.pg.start()

    def start_s3(self, timeout: float = 60) -> None:
        p = self._spawn("s3", [_venv_bin("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
                        self.s3_env())
        _wait("S3 store (moto_server)", lambda: http_ok(f"{self.s3_url}/moto-api/"), p, self.home / "s3.log", timeout)
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id=self.s3_key,
                          aws_secret_access_key=self.s3_secret, region_name="us-east-1")
        for b in BUCKETS:
            s3.create_bucket(Bucket=b)

    def start_mlflow(self, timeout: float = 180) -> None:
        args = [_venv_bin("mlflow") or "mlflow", "server", "--backend-store-uri", self.pg.url("mlflow", "postgresql+psycopg2"),
                "--artifacts-destination", "s3://mlflow/", "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1"]
        p = self._spawn("mlflow", args, {**self.s3_env(), "MLFLOW_DISABLE_TELEMETRY": "true"})
        _wait("MLflow server", lambda: http_ok(f"{self.mlflow_url}/health"), p, self.home / "mlflow.log", timeout)

    def init_git_remote(self) -> None:
        if not self.git_remote.exists():
            subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.git_remote)], check=True)

    def start(self) -> SharedServices:
        try:
            self.start_postgres()
            self.start_s3()
            self.start_mlflow()
            self.init_git_remote()
        except BaseException:
            self.stop()
            raise
        return self

    def stop_service(self, name: str) -> None:
        """Stop one service (``postgres``, ``s3``, ``mlflow``): what a test of a service outage needs."""
        if name == "postgres":
            self.pg.stop(remove=False)
            return
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop(self) -> None:
        for name in ("mlflow", "s3"):  # the MLflow server before its database and its store
            self.stop_service(name)
        self.pg.stop()

    def __enter__(self) -> SharedServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
