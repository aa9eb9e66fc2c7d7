"""One lineage shared by workspaces on several machines: a lock in the shared PostgreSQL database and
the lineage repository synchronised through a git remote (the small files) and the DVC remote (the
data).

Workers share nothing but the services. A step that writes the lineage (an edit's candidate state,
an approval, a promotion, a rollback) runs in :func:`section`: take the cross-host lock (a PostgreSQL
advisory lock, held by one database connection: it goes away with the process that held it, so a
killed worker never leaves it behind), bring the workspace to the shared lineage (``git pull`` +
``dvc pull``), do the step, then publish (``dvc add`` + ``git commit`` + ``dvc push`` + ``git push``).
The ``git push`` is the commit point: data pushed without it is never referenced, so a worker killed
before it leaves the shared lineage as it was.

Configured by the environment (what a worker is given, see infra/README.md): ``KEDIT_LOCK_URL`` (a
``postgresql://`` URL), ``KEDIT_GIT_REMOTE`` (any git URL or path) and ``KEDIT_DVC_REMOTE`` (over
``lineage.dvc_remote``). Without them a workspace works alone, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kedit.lineage.state import LineageError
from kedit.workspace import Workspace

log = logging.getLogger(__name__)

LOCK_ENV = "KEDIT_LOCK_URL"
GIT_REMOTE_ENV = "KEDIT_GIT_REMOTE"
DVC_REMOTE_ENV = "KEDIT_DVC_REMOTE"
LOCK_NAME = "kedit-lineage"
BRANCH = "main"
_LOCAL = threading.local()  # the sections this thread is inside (re-entrant: the outer one locks and publishes)
PAUSE_ENV = "KEDIT_TEST_PAUSE_AT"  # test hook (as kedit.lineage.ops): sleep at a named point to be killed


def _held() -> list[str]:
    if not hasattr(_LOCAL, "ops"):
        _LOCAL.ops = []
    return _LOCAL.ops


def _pause(step: str) -> None:
    if os.environ.get(PAUSE_ENV) == step:
        import sys

        print(f"kedit: paused at {step!r} ({PAUSE_ENV}), pid {os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(3600)


def lock_wait(params: dict[str, Any] | None) -> float:
    """``lineage.lock_wait_s``: how long a writer waits for the cross-host lock (default 600 s)."""
    return float((params or {}).get("lock_wait_s", 600))


def _where(url: str) -> str:
    """``host:port/db`` of a database URL, without the credentials."""
    u = urlsplit(url)
    return f"{u.hostname}:{u.port or 5432}{u.path}"


@dataclass
class Shared:
    """Where the shared lineage lives (None: not shared in that respect)."""

    lock_url: str | None = None
    git_remote: str | None = None
    dvc_remote: str | None = None
    sign: bool = False  # lineage.sign_commits: the publishing commits are signed as the promotions are
    track: tuple[str, ...] = ()  # workspace files each publishing commit carries (approval signing's allowed signers)

    @classmethod
    def from_env(cls, params: dict[str, Any] | None = None) -> Shared:
        params = params or {}
        return cls(lock_url=os.environ.get(LOCK_ENV) or None, git_remote=os.environ.get(GIT_REMOTE_ENV) or None,
                   dvc_remote=os.environ.get(DVC_REMOTE_ENV) or params.get("dvc_remote"),
                   sign=bool(params.get("sign_commits", False)),
                   track=(str(params.get("allowed_signers") or "allowed_signers"),)
                   if params.get("approval_signing") not in (None, False, "off", "none", "") else ())

    @property
    def active(self) -> bool:
        return bool(self.lock_url or self.git_remote)


class LineageLock:
    """A PostgreSQL advisory lock named ``name``, cross-host: every worker using the same database
    contends for it. Held by one connection; released on exit, or by the server when the holding
    process dies (its connection closes)."""

    def __init__(self, url: str, name: str = LOCK_NAME, op: str = "write") -> None:
        self.url, self.name, self.op = url, name, op
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self.con: Any = None

    def _connect(self) -> Any:
        try:
            import psycopg2
        except ImportError as exc:
            raise LineageError(f"{LOCK_ENV} is set but psycopg2 is not installed (pip install 'kedit[stack]')") \
                from exc
        me = f"kedit {socket.gethostname()} pid {os.getpid()}: {self.op}"[:63]
        try:
            con = psycopg2.connect(self.url, connect_timeout=10, application_name=me)
        except psycopg2.OperationalError as exc:
            raise LineageError(f"lineage lock: PostgreSQL at {_where(self.url)} ({LOCK_ENV}) is unreachable; "
                               f"nothing was changed: {str(exc).strip()}") from None
        con.autocommit = True
        return con

    def holder(self) -> str | None:
        """Who holds the lock (the holder's application name: host, pid and operation), if anyone."""
        with self.con.cursor() as cur:
            cur.execute("SELECT a.application_name, a.backend_start FROM pg_locks l JOIN pg_stat_activity a "
                        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND "
                        "((l.classid::bigint << 32) | l.objid::bigint) = (%s::bigint & x'ffffffffffffffff'::bigint) "
                        "AND a.pid <> pg_backend_pid()", (self.key,))
            row = cur.fetchone()
        return f"{row[0]} (connected since {row[1]:%Y-%m-%d %H:%M:%S %Z})" if row else None

    def acquire(self, wait_s: float = 0.0) -> None:
        self.con = self._connect()
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            with self.con.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (self.key,))
                if cur.fetchone()[0]:
                    return
            holder = self.holder()
            if time.monotonic() >= deadline:
                self.con.close()
                self.con = None
                raise LineageError(f"the shared lineage is locked by {holder or 'another worker'} (lock "
                                   f"{self.name!r} in PostgreSQL at {_where(self.url)}); waited {wait_s:.0f} s; "
                                   f"try again when it has finished")
            if not said:
                log.warning("waiting for the shared lineage lock held by %s", holder)
                said = True
            time.sleep(0.5)

    def release(self) -> None:
        if self.con is None:
            return
        try:
            with self.con.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        finally:
            self.con.close()
            self.con = None

    @contextlib.contextmanager
    def held(self, wait_s: float = 0.0) -> Iterator[LineageLock]:
        self.acquire(wait_s)
        try:
            yield self
        finally:
            self.release()


# --- the lineage repository through git + DVC remotes --------------------------------------------------
def _versioning(ws: Workspace, shared: Shared):
    from kedit.lineage.versioning import Versioning

    return Versioning(ws, remote=shared.dvc_remote, sign=shared.sign, track=shared.track)


def _remote_head(v, remote: str) -> str | None:
    out = v.git("ls-remote", remote, f"refs/heads/{BRANCH}", check=False)
    return out.split()[0] if out else None


def check_git_remote(remote: str) -> None:
    """Raise a clear error when the lineage git remote cannot be reached."""
    import subprocess

    p = subprocess.run(["git", "ls-remote", "--heads", remote], capture_output=True, text=True,
                       env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}, timeout=60)
    if p.returncode != 0:
        raise LineageError(f"lineage git remote {remote} ({GIT_REMOTE_ENV}) is unreachable; nothing was changed: "
                           f"{p.stderr.strip()[-500:]}")


def check_mlflow() -> None:
    """Raise a clear error when ``MLFLOW_TRACKING_URI`` names a server that does not answer."""
    import urllib.error
    import urllib.request

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            return
    except (urllib.error.URLError, OSError) as exc:
        raise LineageError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable; nothing was "
                           f"changed: {exc}") from None


def check_object_store(shared: Shared) -> None:
    """Raise a clear error when the S3 endpoint of an ``s3://`` DVC remote does not answer."""
    import urllib.error
    import urllib.request

    if not (shared.dvc_remote or "").startswith("s3://"):
        return
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return  # AWS itself: reached through boto's own resolution when DVC runs
    try:
        with urllib.request.urlopen(endpoint, timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answered (403 / 404 without credentials)
    except (urllib.error.URLError, OSError) as exc:
        raise LineageError(f"S3 object store {endpoint} (AWS_ENDPOINT_URL_S3, the DVC remote "
                           f"{shared.dvc_remote}) is unreachable; nothing was changed: {exc}") from None


def init_path_remote(remote: str) -> None:
    """A git remote that is a plain path (a shared volume) with no repository yet: create it (bare)."""
    import subprocess

    if "://" in remote or ":" in remote.split("/")[0]:
        return  # a URL or an scp-like address: a git server's repository, made there
    local = Path(remote)
    if not local.exists() or (local.is_dir() and not any(local.iterdir())):
        local.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", BRANCH, remote], check=True, capture_output=True)


def attach(ws: Workspace, shared: Shared) -> None:
    """Make ``ws`` a clone of the shared lineage repository, or seed the remote from it when the remote
    is empty. A workspace already attached is left alone."""
    v = _versioning(ws, shared)
    if (ws.root / ".git").exists() and v.git("remote", "get-url", "origin", check=False):
        return
    ws.root.mkdir(parents=True, exist_ok=True)
    init_path_remote(shared.git_remote)
    if not (ws.root / ".git").exists():
        v.git("init", "-q", "-b", BRANCH)
    v.git("remote", "add", "origin", shared.git_remote)
    if _remote_head(v, "origin") is not None:
        v.git("fetch", "-q", "origin", BRANCH, "--tags", "--force")
        v.git("reset", "-q", "--hard", f"origin/{BRANCH}")
        v.git("branch", "-q", "--set-upstream-to", f"origin/{BRANCH}")
        v.ensure()  # git identity; the DVC config came with the clone
        v.dvc("pull", "-q", "--force")
    else:
        v.ensure()
        v.git("push", "-q", "-u", "origin", BRANCH)


def pull(ws: Workspace, shared: Shared) -> bool:
    """Bring the workspace to the shared lineage (fast-forward + ``dvc pull``). True if it moved.

    Local lineage changes not yet published are kept when the shared lineage has not moved; when it
    has, they are refused with a clear error (two writers outside the lock), and nothing is changed."""
    v = _versioning(ws, shared)
    attach(ws, shared)
    v.git("fetch", "-q", "origin", BRANCH, "--tags", "--force")
    local, remote = v.git("rev-parse", "HEAD"), v.git("rev-parse", f"origin/{BRANCH}")
    if local == remote or _is_ancestor(v, remote, local):
        return False  # up to date, or local commits still to publish
    if not _is_ancestor(v, local, remote):
        raise LineageError(f"{ws.root}: the local lineage commit {local[:12]} and the shared {remote[:12]} "
                           f"({shared.git_remote}) have diverged (a write outside the shared lock); nothing was "
                           f"changed; inspect with `git log --graph --all` in {ws.root}")
    changed = json.loads(v.dvc("status", "--json", check=False) or "{}")
    if changed:
        raise LineageError(f"{ws.root}: lineage changes here are not published and the shared lineage moved on "
                           f"to {remote[:12]}; nothing was changed. Publish them (inside the shared lock) or "
                           f"discard them (`dvc checkout --force`): {sorted(changed)}")
    v.git("merge", "-q", "--ff-only", f"origin/{BRANCH}")
    v.dvc("pull", "-q", "--force")
    return True


def _is_ancestor(v, a: str, b: str) -> bool:
    import subprocess

    return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=v.root,
                          capture_output=True).returncode == 0


def publish(ws: Workspace, shared: Shared, message: str) -> dict[str, str]:
    """``dvc add`` + commit + ``dvc push``, then ``git push`` (the commit point) of the branch and tags."""
    v = _versioning(ws, shared)
    info = v.snapshot(message, push=True)
    _pause("publish")
    v.git("push", "-q", "origin", BRANCH)
    v.git("push", "-q", "--force", "origin", "refs/tags/*:refs/tags/*")
    return info


@contextlib.contextmanager
def section(ws: Workspace, op: str, params: dict[str, Any] | None = None, wait_s: float = 0.0,
            publish_after: bool = True) -> Iterator[Shared]:
    """Lock, pull, run the body, publish; a no-op wrapper where nothing is shared.

    Every service the step needs is checked before anything is changed (a service that is down is
    named in the error). Re-entrant: a section inside another (a promotion inside a decide step)
    leaves the lock, the pull and the publishing to the outer one. ``publish_after=False``: leave the
    changes unpublished (they go with the next section's publish)."""
    shared = Shared.from_env(params)
    held = _held()
    if not shared.active or held:  # not shared, or inside an outer section of this thread (it publishes)
        yield shared
        return
    lock = LineageLock(shared.lock_url, op=op) if shared.lock_url else None
    if lock is not None:
        lock.acquire(wait_s)
    held.append(op)
    try:
        check_mlflow()
        check_object_store(shared)
        if shared.git_remote:
            init_path_remote(shared.git_remote)
            check_git_remote(shared.git_remote)
            pull(ws, shared)
        yield shared
        if shared.git_remote and publish_after:
            publish(ws, shared, f"kedit: {op}")
    finally:
        held.pop()
        if lock is not None:
            lock.release()


def sync(ws: Workspace, params: dict[str, Any] | None = None, wait_s: float = 0.0) -> None:
    """Bring the workspace to the shared lineage under the lock: a reader's step (the nightly run's
    first, so its feed is checked against the shared champion). Nothing to do where nothing is shared."""
    with section(ws, "sync", params, wait_s=wait_s, publish_after=False):
        pass
