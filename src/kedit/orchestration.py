"""Talking to a Prefect server without importing Prefect: its REST API over HTTP, plus a local
control plane (server + process workers on 127.0.0.1) for the demo and the integration test.

The core library stays Prefect-free (flows and tasks live outside ``src/``); approving, rejecting
and triggering runs are plain HTTP calls any tool could make.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WAITING_STATES = ("PAUSED",)  # Prefect reports both paused and suspended runs with state type PAUSED
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class PrefectAPIError(RuntimeError):
    pass


@dataclass
class PrefectAPI:
    """Minimal client of the Prefect 3 REST API (``PREFECT_API_URL``, e.g. http://127.0.0.1:4200/api)."""

    url: str = field(default_factory=lambda: os.environ.get("PREFECT_API_URL", ""))
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.url:
            raise PrefectAPIError("no Prefect API: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) "
                                  "or start the local stack with `kedit nightly demo`")
        self.url = self.url.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise PrefectAPIError(f"{method} {path}: HTTP {exc.code} {exc.read().decode(errors='replace')[:500]}") from None
        except urllib.error.URLError as exc:
            raise PrefectAPIError(f"Prefect API at {self.url} unreachable: {exc.reason}") from None
        return json.loads(raw) if raw else None

    def healthy(self) -> bool:
        try:
            self.call("GET", "/health")
            return True
        except PrefectAPIError:
            return False

    def deployment(self, name: str) -> dict[str, Any]:
        flow_name, _, dep_name = name.partition("/")
        return self.call("GET", f"/deployments/name/{flow_name}/{dep_name}")

    def run_deployment(self, name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        dep = self.deployment(name)
        return self.call("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters or {}})

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.call("GET", f"/flow_runs/{run_id}")

    def flow_runs(self, state_types: list[str] | None = None, limit: int = 50) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"limit": limit, "sort": "EXPECTED_START_TIME_DESC"}
        if state_types:
            body["flow_runs"] = {"state": {"type": {"any_": state_types}}}
        return self.call("POST", "/flow_runs/filter", body)

    def resume(self, run_id: str, run_input: dict[str, Any]) -> dict[str, Any]:
        out = self.call("POST", f"/flow_runs/{run_id}/resume", {"run_input": run_input})
        if (out or {}).get("status") != "ACCEPT":
            raise PrefectAPIError(f"flow run {run_id} did not accept the resume: {out}")
        return out

    def wait(self, run_id: str, until: tuple[str, ...], timeout: float = 1800, poll: float = 2.0,
             on_poll=None) -> dict[str, Any]:
        """Poll a flow run until its state type is in ``until`` (or a final state); return the run."""
        deadline = time.monotonic() + timeout
        while True:
            fr = self.flow_run(run_id)
            st = (fr.get("state") or {}).get("type")
            if on_poll:
                on_poll(fr)
            if st in until or st in FINAL_STATES:
                return fr
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {fr.get('name')} still {st} after {timeout:.0f} s")
            time.sleep(poll)

    def awaiting_approval(self, state_ref: str | None = None) -> list[dict[str, Any]]:
        """Paused/suspended nightly runs, optionally the one waiting for edit state ``state_ref``."""
        out = []
        for fr in self.flow_runs(["PAUSED"]):
            key = ((fr.get("state") or {}).get("state_details") or {}).get("pause_key") or ""
            if not key.startswith("approval-"):
                continue
            sid = key[len("approval-"):]
            if state_ref is None or sid.startswith(state_ref[:16]) or fr["id"] == state_ref or fr["name"] == state_ref:
                out.append({**fr, "kedit_state": sid})
        return out

    def set_state(self, run_id: str, state_type: str, message: str) -> dict[str, Any]:
        return self.call("POST", f"/flow_runs/{run_id}/set_state",
                         {"state": {"type": state_type, "message": message}, "force": True})

    def overdue_approvals(self, now: float | None = None) -> list[dict[str, Any]]:
        """Waiting runs whose approval deadline (the pause timeout) has passed."""
        import datetime as dt

        now_dt = dt.datetime.fromtimestamp(now or time.time(), dt.UTC)
        out = []
        for fr in self.awaiting_approval():
            deadline = ((fr.get("state") or {}).get("state_details") or {}).get("pause_timeout")
            if deadline and dt.datetime.fromisoformat(deadline.replace("Z", "+00:00")) < now_dt:
                out.append(fr)
        return out

    def decide(self, ref: str, approve: bool, approver: str, comment: str = "") -> dict[str, Any]:
        """Resume the run waiting on ``ref`` (an edit-state id prefix, flow-run id or name) with a verdict."""
        runs = self.awaiting_approval(ref)
        late = {r["id"] for r in self.overdue_approvals()}
        if any(r["id"] in late for r in runs):
            raise PrefectAPIError(f"the approval of {ref!r} timed out; it counts as rejected (run `kedit nightly "
                                  f"expire` to record it) and a new refresh must produce a new candidate")
        if not runs:
            waiting = [f"{r['name']} (state {r['kedit_state'][:12]})" for r in self.awaiting_approval()]
            raise PrefectAPIError(f"no refresh is waiting for approval of {ref!r}; waiting now: {waiting or 'none'}")
        if len(runs) > 1:
            raise PrefectAPIError(f"{ref!r} matches several waiting runs: {[r['name'] for r in runs]}")
        run = runs[0]
        self.resume(run["id"], {"approve": approve, "approver": approver, "comment": comment})
        return run


def expire_overdue(api: PrefectAPI, store, by: str = "kedit-timeout") -> list[str]:
    """A timed-out approval rejects: mark each overdue waiting run Failed and record the rejection in
    the lineage (the champion does not move). Returns the state ids rejected."""
    done = []
    for fr in api.overdue_approvals():
        sid = store.resolve(fr["kedit_state"])
        if not any(e.type == "reject" and e.state == sid and e.by == by for e in store.events()):
            store.reject(sid, by=by, comment=f"no approval before the deadline (flow run {fr['name']})")
        api.set_state(fr["id"], "FAILED", "approval timed out: candidate rejected, champion unchanged")
        done.append(sid)
    return done


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
            "PREFECT_LOGGING_LEVEL": env.get("PREFECT_LOGGING_LEVEL", "INFO"),
            "KEDIT_HOME": str(self.workspace), "KEDIT_PROJECT_DIR": str(self.project_dir),
            "KEDIT_PARAMS": str(Path(self.params).resolve() if self.params else self.project_dir / "params.yaml"),
            "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
            "GX_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1",
        })
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

    def start_server(self, timeout: float = 120) -> PrefectAPI:
        self._spawn("server", [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
        api = PrefectAPI(self.api_url)
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
            # no --limit on cpu: a resumed (suspended) run re-submitted while the worker still holds its
            # concurrency slot crashes Prefect 3.8.8's limiter ("borrower is already holding a token")
            limit = ["--limit", "1"] if pool == "gpu" else []
            self._spawn(f"worker-{pool}", [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                           *limit])

    def start(self) -> PrefectAPI:
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
