"""A local control plane for the demo and the integration test: a Prefect server and process workers
(pools ``cpu`` and ``gpu``) on 127.0.0.1, started and stopped as child processes through the ``prefect``
command, everything under one folder. The server's database is SQLite under that folder, or PostgreSQL
(``database_url``; see :mod:`kedit.orchestration.services`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kedit.orchestration.runs import PrefectAPIError, PrefectRuns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


@dataclass
class LocalStack:
    """A Prefect server and process workers (pools ``cpu`` and ``gpu``) on 127.0.0.1.

    Everything lives under ``home`` (PREFECT_HOME, results, logs) and is torn down by :meth:`stop`,
    workers first (a worker whose server is gone ignores SIGTERM).
    """

    home: Path
    project_dir: Path
    workspace: Path
    params: Path | None = None  # the pipeline's params.yaml (default: the project's)
    port: int = 0
    # the server's database (``postgresql+asyncpg://...``, e.g. SharedServices.prefect_db_url); None: SQLite
    database_url: str | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.project_dir = Path(self.project_dir).resolve()
        self.workspace = Path(self.workspace).resolve()
        self.port = self.port or free_port()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(self.home / "results"),
            "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            # SQLite waits this long for a lock before the server answers 503 (default 10 s: too short
            # on a loaded 2-core machine running the model work and the server side by side)
            "PREFECT_SERVER_DATABASE_TIMEOUT": env.get("PREFECT_SERVER_DATABASE_TIMEOUT", "30"),
            "PREFECT_LOGGING_LEVEL": env.get("PREFECT_LOGGING_LEVEL", "INFO"),
            "PREFECT_LOGGING_EXTRA_LOGGERS": "kedit",  # kedit's step progress in the flow run logs
            "KEDIT_HOME": str(self.workspace), "KEDIT_PROJECT_DIR": str(self.project_dir),
            "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
            "GX_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1",
        })
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        if self.params:  # else the workers look params.yaml up as the CLI does (kedit.params.load_params)
            env["KEDIT_PARAMS"] = str(Path(self.params).resolve())
        env["PYTHONPATH"] = os.pathsep.join([str(self.project_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / f"{name}.log", "ab")
        p = subprocess.Popen(args, cwd=self.project_dir, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def prefect(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run([_bin("prefect"), *args], cwd=self.project_dir, env=self.env(), capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise PrefectAPIError(f"prefect {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        return r.stdout

    def start_server(self, timeout: float = 120) -> PrefectRuns:
        self._spawn("server", [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
        api = PrefectRuns(self.api_url)
        deadline = time.monotonic() + timeout
        while not api.healthy():
            if self.procs["server"].poll() is not None:
                raise PrefectAPIError(f"prefect server exited; see {self.home / 'server.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server not healthy after {timeout} s; see {self.home / 'server.log'}")
            time.sleep(1)
        return api

    def create_pools(self, pools: tuple[str, ...] = ("cpu", "gpu")) -> None:
        for pool in pools:
            self.prefect("work-pool", "create", pool, "--type", "process", "--overwrite")

    def deploy(self) -> str:
        """Register every deployment of the project's prefect.yaml."""
        return self.prefect("--no-prompt", "deploy", "--all")

    def start_workers(self, pools: tuple[str, ...] = ("cpu", "gpu")) -> None:
        for pool in pools:
            # no --limit on cpu: a resumed (suspended) run re-submitted while the worker still held its slot
            # crashed Prefect 3.8's limiter; not re-checked on the pinned 3.9 (a --limit may now be safe)
            limit = ["--limit", "1"] if pool == "gpu" else []
            self._spawn(f"worker-{pool}", [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                           *limit])

    def start(self) -> PrefectRuns:
        api = self.start_server()
        self.create_pools()
        self.deploy()
        self.start_workers()
        return api

    def stop(self) -> None:
        order = sorted(self.procs, key=lambda n: n == "server")  # workers before the server
        for name in order:
            p = self.procs[name]
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
