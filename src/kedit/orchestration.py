"""Talking to a Prefect server without importing Prefect: its REST API over HTTP, plus a local
control plane (server + process workers on 127.0.0.1) for the demo and the integration test.

The core library stays Prefect-free (flows and tasks live outside ``src/``); approving, rejecting
and triggering runs are plain HTTP calls any tool could make.
"""

from __future__ import annotations

import contextlib
import datetime as dt
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WAITING_STATES = ("PAUSED",)  # Prefect reports both paused and suspended runs with state type PAUSED
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
RETRYABLE_HTTP = (429, 502, 503)


class PrefectAPIError(RuntimeError):
    pass


@dataclass
class PrefectAPI:
    """Minimal client of the Prefect 3 REST API (``PREFECT_API_URL``, e.g. http://127.0.0.1:4200/api)."""

    url: str = field(default_factory=lambda: os.environ.get("PREFECT_API_URL", ""))
    timeout: float = 30.0
    retries: int = 5  # for retryable answers (RETRYABLE_HTTP); waits backoff·2^attempt s, ~30 s in all
    backoff: float = 1.0

    def __post_init__(self) -> None:
        if not self.url:
            raise PrefectAPIError("no Prefect API: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) "
                                  "or start the local stack with `kedit nightly demo`")
        self.url = self.url.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; answers the server marks as retryable (503: e.g. its SQLite database was locked,
        429, 502) are retried with exponential backoff, as Prefect's own client does."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if exc.code in RETRYABLE_HTTP and attempt < self.retries:
                    time.sleep(_retry_after(exc.headers.get("Retry-After"), self.backoff * 2 ** attempt))
                    continue
                raise PrefectAPIError(f"{method} {path}: HTTP {exc.code} {detail}"
                                      + (f" (after {attempt + 1} attempts)" if attempt else "")) from None
            except urllib.error.URLError as exc:
                raise PrefectAPIError(f"Prefect API at {self.url} unreachable: {exc.reason}") from None
        raise AssertionError("unreachable")

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
        # the key makes a retried POST (after a 503) return the run the first attempt may have created
        return self.call("POST", f"/deployments/{dep['id']}/create_flow_run",
                         {"parameters": parameters or {}, "idempotency_key": f"kedit-{uuid.uuid4()}"})

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
            run = {**fr, "kedit_state": key[len("approval-"):]}
            if state_ref is None or _matches(run, state_ref):
                out.append(run)
        return out

    def set_state(self, run_id: str, state_type: str, message: str) -> dict[str, Any]:
        return self.call("POST", f"/flow_runs/{run_id}/set_state",
                         {"state": {"type": state_type, "message": message}, "force": True})

    def flow_run_states(self, run_id: str) -> list[dict[str, Any]]:
        """Every state a flow run has been in, oldest first."""
        states = self.call("GET", f"/flow_run_states/?flow_run_id={run_id}") or []
        return sorted(states, key=lambda st: st.get("timestamp") or "")

    def overdue_approvals(self, now: float | None = None) -> list[dict[str, Any]]:
        """Waiting runs whose approval deadline (the pause timeout) has passed."""
        return _past_deadline(self.awaiting_approval(), now)

    def timed_out_approvals(self, now: float | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Every run whose approval timed out: still waiting past its deadline, or already failed by the
        Prefect server's own pause-expiration service (which fails an expired pause every few seconds,
        so a sweep that only looked at waiting runs would miss most timeouts)."""
        out = self.overdue_approvals(now)
        waiting = {fr["id"] for fr in out}
        for fr in self.flow_runs(["FAILED"], limit=limit):
            if fr["id"] in waiting:  # failed by the server between the two queries: listed once
                continue
            sid = approval_timeout_of(self.flow_run_states(fr["id"]))
            if sid is not None:
                out.append({**fr, "kedit_state": sid})
        return out

    def decide(self, ref: str, approve: bool, approver: str, comment: str = "") -> dict[str, Any]:
        """Resume the run waiting on ``ref`` (an edit-state id prefix, flow-run id or name) with a verdict."""
        waiting = self.awaiting_approval()
        late = {r["id"] for r in _past_deadline(waiting)}
        runs = [r for r in waiting if _matches(r, ref) and r["id"] not in late]
        if not runs and any(_matches(r, ref) for r in self.timed_out_approvals()):
            raise PrefectAPIError(f"the approval of {ref!r} timed out; it counts as rejected (run `kedit nightly "
                                  f"expire` to record it) and a new refresh must produce a new candidate")
        if not runs:
            names = [f"{r['name']} (state {r['kedit_state'][:12]})" for r in waiting]
            raise PrefectAPIError(f"no refresh is waiting for approval of {ref!r}; waiting now: {names or 'none'}")
        if len(runs) > 1:
            raise PrefectAPIError(f"{ref!r} matches several waiting runs: {[r['name'] for r in runs]}")
        run = runs[0]
        self.resume(run["id"], {"approve": approve, "approver": approver, "comment": comment})
        return run


def expire_overdue(api: PrefectAPI, store, by: str = "kedit-timeout") -> list[str]:
    """A timed-out approval rejects: record the rejection in the lineage (once; the champion does not
    move) and mark the run Failed if the Prefect server has not already done so. Returns the state ids
    rejected by this sweep."""
    done = []
    for fr in api.timed_out_approvals():
        sid = store.resolve(fr["kedit_state"])
        recorded = any(e.type == "reject" and e.state == sid and e.by == by for e in store.events())
        if not recorded:
            store.reject(sid, by=by, comment=f"no approval before the deadline (flow run {fr['name']})")
        still_waiting = (fr.get("state") or {}).get("type") == "PAUSED"
        if still_waiting:
            api.set_state(fr["id"], "FAILED", "approval timed out: candidate rejected, champion unchanged")
        if not recorded or still_waiting:
            done.append(sid)
    return done


def approval_timeout_of(states: list[dict[str, Any]]) -> str | None:
    """The edit-state key of a run whose approval pause ran out, from its state history (oldest first):
    the run ends Failed right after a pause keyed ``approval-<state>`` whose deadline had passed when it
    failed. None for every other history (resumed, rejected, failed for another reason)."""
    if len(states) < 2 or states[-1].get("type") != "FAILED":
        return None
    pause, failed = states[-2], states[-1]
    details = pause.get("state_details") or {}
    key, deadline = details.get("pause_key") or "", details.get("pause_timeout")
    if pause.get("type") != "PAUSED" or not key.startswith("approval-") or not deadline:
        return None
    if not failed.get("timestamp") or _parse_time(deadline) > _parse_time(failed["timestamp"]):
        return None
    return key[len("approval-"):]


def _retry_after(header: str | None, default: float) -> float:
    try:
        return min(max(float(header), 0.0), 60.0) if header else default
    except ValueError:
        return default


def _matches(run: dict[str, Any], ref: str) -> bool:
    return run["kedit_state"].startswith(ref[:16]) or ref in (run["id"], run["name"])


def _past_deadline(waiting: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """The waiting runs whose pause timeout lies before ``now`` (default: the current time)."""
    now_dt = dt.datetime.fromtimestamp(now or time.time(), dt.UTC)
    return [fr for fr in waiting
            if (deadline := ((fr.get("state") or {}).get("state_details") or {}).get("pause_timeout"))
            and _parse_time(deadline) < now_dt]


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


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
            # SQLite waits this long for a lock before the server answers 503 (default 10 s: too short
            # on a loaded 2-core machine running the model work and the server side by side)
            "PREFECT_SERVER_DATABASE_TIMEOUT": env.get("PREFECT_SERVER_DATABASE_TIMEOUT", "30"),
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
            # no --limit on cpu: a resumed (suspended) run re-submitted while the worker still held its slot
            # crashed Prefect 3.8's limiter; not re-checked on the pinned 3.9 (a --limit may now be safe)
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
