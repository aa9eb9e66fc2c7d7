"""The nightly runs on a Prefect server, through Prefect's own client (``get_client``): trigger a
deployment, list the runs that wait for approval, resume one with a verdict, sweep timed-out approvals.

Prefect's client brings what a hand-written REST client had to redo: request retries (429, 502, 503
and ``PREFECT_CLIENT_RETRY_EXTRA_CODES``, ``PREFECT_CLIENT_MAX_RETRIES`` times, default 5, honouring
``Retry-After``; a Prefect server on SQLite answers 503 while its database is locked), typed filters,
``resume_flow_run(run_input=...)`` and ``wait_for_flow_run``. Errors come out as :class:`PrefectAPIError`
with what failed and where.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kedit.orchestration.approvals import (
    ApprovalRun,
    approval_ref,
    approval_timeout_of,
    parse_time,
    past_deadline,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger(__name__)

FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class PrefectAPIError(RuntimeError):
    pass


def state_type(fr: FlowRun) -> str | None:
    """The run's state type as a plain string (``PAUSED``, ``COMPLETED``, ...)."""
    return fr.state.type.value if fr.state else None


@dataclass
class PrefectRuns:
    """Flow runs and deployments of one Prefect server.

    ``url``: the API (e.g. http://127.0.0.1:4200/api); default ``PREFECT_API_URL`` from the environment or
    the active Prefect profile. Without one Prefect would start a throw-away ephemeral server, which holds
    no runs to approve, so that is an error here.
    """

    url: str | None = None

    def __post_init__(self) -> None:
        from prefect.settings import PREFECT_API_URL

        self.url = (self.url or PREFECT_API_URL.value() or "").rstrip("/")
        if not self.url:
            raise PrefectAPIError("no Prefect API: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) "
                                  "or start the local stack with `kedit nightly demo`")

    @contextlib.contextmanager
    def client(self, what: str) -> Iterator[SyncPrefectClient]:
        """Prefect's sync client for this server; HTTP and connection errors become PrefectAPIError."""
        import httpx
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            client = get_client(sync_client=True)
        try:
            with client:
                yield client
        except ObjectNotFound:
            raise PrefectAPIError(f"{what}: not found on the Prefect API at {self.url}") from None
        except httpx.HTTPStatusError as exc:
            detail = exc.response.text[:500]
            raise PrefectAPIError(f"{what}: HTTP {exc.response.status_code} {detail}") from None
        except httpx.TransportError as exc:
            raise PrefectAPIError(f"{what}: Prefect API at {self.url} unreachable: {exc}") from None

    def healthy(self) -> bool:
        try:
            with self.client("health check") as c:
                return c.api_healthcheck() is None
        except PrefectAPIError:
            return False

    def run_deployment(self, name: str, parameters: dict[str, Any] | None = None,
                       idempotency_key: str | None = None) -> FlowRun:
        """Start a run of deployment ``flow-name/deployment-name``.

        The idempotency key travels with the POST, so when Prefect's client retries it (after a 503 the
        first attempt may have been written) the server returns the run already created instead of a
        second one; pass the same key again to make a repeated trigger idempotent too.
        """
        with self.client(f"deployment {name!r}") as c:
            dep = c.read_deployment_by_name(name)
            return c.create_flow_run_from_deployment(dep.id, parameters=parameters or {},
                                                     idempotency_key=idempotency_key or f"kedit-{uuid.uuid4()}")

    def flow_run(self, run_id: str | uuid.UUID) -> FlowRun:
        with self.client(f"flow run {run_id}") as c:
            return c.read_flow_run(uuid.UUID(str(run_id)))

    def flow_runs(self, state_types: list[str] | None = None, limit: int = 50) -> list[FlowRun]:
        """The latest runs (newest expected start first), optionally only those in ``state_types``."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        flt = None
        if state_types:
            flt = FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType(t) for t in state_types])))
        with self.client("flow runs") as c:
            return c.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit)

    def flow_run_states(self, run_id: str | uuid.UUID) -> list[dict[str, Any]]:
        """Every state a flow run has been in, oldest first, as the API's JSON records."""
        with self.client(f"states of flow run {run_id}") as c:
            states = c.read_flow_run_states(uuid.UUID(str(run_id)))
        records = [s.model_dump(mode="json") for s in states]
        never = dt.datetime.min.replace(tzinfo=dt.UTC)
        return sorted(records, key=lambda st: parse_time(st["timestamp"]) if st.get("timestamp") else never)

    def awaiting_approval(self, ref: str | None = None) -> list[ApprovalRun]:
        """Paused/suspended nightly runs, optionally only the one waiting on ``ref`` (state id, run id or name)."""
        out = []
        for fr in self.flow_runs(["PAUSED"]):
            run = _approval_run(fr)
            if run is not None and (ref is None or run.matches(ref)):
                out.append(run)
        return out

    def overdue_approvals(self, now: float | None = None) -> list[ApprovalRun]:
        """Waiting runs whose approval deadline (the pause timeout) has passed."""
        return past_deadline(self.awaiting_approval(), now)

    def timed_out_approvals(self, now: float | None = None, limit: int = 50) -> list[ApprovalRun]:
        """Every run whose approval timed out: still waiting past its deadline, or already failed by the
        Prefect server's own pause-expiration service (which fails an expired pause every few seconds,
        so a sweep that only looked at waiting runs would miss most timeouts)."""
        out = self.overdue_approvals(now)
        waiting = {r.id for r in out}
        for fr in self.flow_runs(["FAILED"], limit=limit):
            if str(fr.id) in waiting:  # failed by the server between the two queries: listed once
                continue
            states = self.flow_run_states(fr.id)
            ref = approval_timeout_of(states)
            if ref is not None:
                deadline = states[-2]["state_details"]["pause_timeout"]
                out.append(ApprovalRun(str(fr.id), fr.name, ref, "FAILED", parse_time(deadline)))
        return out

    def decide(self, ref: str, approve: bool, approver: str, comment: str = "") -> ApprovalRun:
        """Resume the run waiting on ``ref`` (an edit-state id prefix, flow-run id or name) with a verdict."""
        waiting = self.awaiting_approval()
        late = {r.id for r in past_deadline(waiting)}
        runs = [r for r in waiting if r.matches(ref) and r.id not in late]
        if not runs and any(r.matches(ref) for r in self.timed_out_approvals()):
            raise PrefectAPIError(f"the approval of {ref!r} timed out; it counts as rejected (run `kedit nightly "
                                  f"expire` to record it) and a new refresh must produce a new candidate")
        if not runs:
            names = [f"{r.name} (state {r.state_ref[:12]})" for r in waiting]
            raise PrefectAPIError(f"no refresh is waiting for approval of {ref!r}; waiting now: {names or 'none'}")
        if len(runs) > 1:
            raise PrefectAPIError(f"{ref!r} matches several waiting runs: {[r.name for r in runs]}")
        run = runs[0]
        verdict = {"approve": approve, "approver": approver, "comment": comment}
        with self.client(f"resume of flow run {run.name}") as c:
            out = c.resume_flow_run(uuid.UUID(run.id), run_input=verdict)
        if out.status.value != "ACCEPT":
            reason = getattr(out.details, "reason", None) or out.details
            raise PrefectAPIError(f"flow run {run.name} did not accept the resume ({out.status.value}): {reason}")
        return run

    def fail(self, run_id: str | uuid.UUID, message: str) -> None:
        """Force a run into Failed (used for an approval that timed out while the run was suspended)."""
        from prefect.states import Failed

        with self.client(f"flow run {run_id}") as c:
            c.set_flow_run_state(uuid.UUID(str(run_id)), Failed(message=message), force=True)

    def wait(self, run_id: str | uuid.UUID, until: tuple[str, ...] = (), timeout: float = 1800,
             poll: float = 2.0, on_poll: Callable[[FlowRun], None] | None = None) -> FlowRun:
        """Wait until the run's state type is in ``until`` or final; return the run.

        Only a final state wanted and nothing to show: Prefect's ``wait_for_flow_run`` (it listens to the
        run's state events). A pause (not final) or progress to show needs polling.
        """
        if not until and on_poll is None:
            return self._wait_final(run_id, timeout)
        deadline = time.monotonic() + timeout
        while True:
            fr = self.flow_run(run_id)
            st = state_type(fr)
            if on_poll:
                on_poll(fr)
            if st in until or st in FINAL_STATES:
                return fr
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {fr.name} still {st} after {timeout:.0f} s")
            time.sleep(poll)

    def _wait_final(self, run_id: str | uuid.UUID, timeout: float) -> FlowRun:
        from prefect.exceptions import FlowRunWaitTimeout
        from prefect.flow_runs import wait_for_flow_run
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.url}):
            try:
                return asyncio.run(wait_for_flow_run(uuid.UUID(str(run_id)), timeout=int(timeout)))
            except FlowRunWaitTimeout:
                raise TimeoutError(f"flow run {run_id} not finished after {timeout:.0f} s") from None


def _approval_run(fr: FlowRun) -> ApprovalRun | None:
    state = fr.state.model_dump(mode="json") if fr.state else None
    ref = approval_ref(state)
    if ref is None:
        return None
    deadline = state["state_details"].get("pause_timeout")
    return ApprovalRun(str(fr.id), fr.name, ref, "PAUSED", parse_time(deadline) if deadline else None)


def expire_overdue(runs: PrefectRuns, store, by: str = "kedit-timeout", ws=None) -> list[str]:
    """A timed-out approval rejects: record the rejection in the lineage (once; the champion does not
    move; with ``ws`` also on the MLflow model version, which loses the ``candidate`` alias) and mark the
    run Failed if the Prefect server has not already done so. Returns the state ids rejected by this sweep.

    One Prefect server serves several workspaces: a run waiting on a state this lineage does not hold is
    another workspace's, left to that workspace's sweep."""
    from kedit.lineage.state import LineageError

    done = []
    for run in runs.timed_out_approvals():
        try:
            sid = store.resolve(run.state_ref)
        except LineageError:
            log.info("approval run %s waits on state %s, not in %s: left to its own workspace",
                     run.name, run.state_ref, store.root)
            continue
        recorded = any(e.type == "reject" and e.state == sid and e.by == by for e in store.events())
        if not recorded:
            comment = f"no approval before the deadline (flow run {run.name})"
            if ws is not None:
                from kedit.lineage.ops import reject

                reject(ws, store, sid, by=by, comment=comment)
            else:
                store.reject(sid, by=by, comment=comment)
        if run.waiting:
            runs.fail(run.id, "approval timed out: candidate rejected, champion unchanged")
        if not recorded or run.waiting:
            done.append(sid)
    return done
