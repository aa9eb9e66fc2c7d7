"""Which nightly runs wait for (or timed out waiting for) an approval: pure functions over state
records, so the deadline rules can be checked without a server.

A nightly run waits with a pause keyed ``approval-<edit state id prefix>`` whose ``pause_timeout`` is
the approval deadline. State records are dicts shaped like the Prefect API's JSON (``type``,
``timestamp``, ``state_details.pause_key`` / ``pause_timeout``), as ``State.model_dump(mode="json")``
gives them.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

PAUSE_KEY_PREFIX = "approval-"


@dataclass(frozen=True)
class ApprovalRun:
    """A nightly flow run that waits, or waited, for a verdict on one candidate edit state."""

    id: str
    name: str
    state_ref: str  # the edit-state id prefix from the pause key (16 hex characters)
    state_type: str  # PAUSED while it waits (paused and suspended runs alike); FAILED once timed out
    deadline: dt.datetime | None  # the pause timeout: no verdict after it counts

    @property
    def waiting(self) -> bool:
        return self.state_type == "PAUSED"

    def matches(self, ref: str) -> bool:
        """``ref`` is an edit-state id (or a prefix of one), the flow run's id, or its name."""
        return self.state_ref.startswith(ref[:16]) or ref in (self.id, self.name)


def approval_ref(state: dict[str, Any] | None) -> str | None:
    """The edit-state prefix a paused state waits on, or None for any other state."""
    details = (state or {}).get("state_details") or {}
    key = details.get("pause_key") or ""
    if (state or {}).get("type") != "PAUSED" or not key.startswith(PAUSE_KEY_PREFIX):
        return None
    return key[len(PAUSE_KEY_PREFIX):]


def approval_timeout_of(states: list[dict[str, Any]]) -> str | None:
    """The edit-state key of a run whose approval pause ran out, from its state history (oldest first):
    the run ends Failed right after a pause keyed ``approval-<state>`` whose deadline had passed when it
    failed. None for every other history (resumed, rejected, failed for another reason)."""
    if len(states) < 2 or states[-1].get("type") != "FAILED":
        return None
    pause, failed = states[-2], states[-1]
    ref = approval_ref(pause)
    deadline = (pause.get("state_details") or {}).get("pause_timeout")
    if ref is None or not deadline:
        return None
    if not failed.get("timestamp") or parse_time(deadline) > parse_time(failed["timestamp"]):
        return None
    return ref


def past_deadline(runs: list[ApprovalRun], now: float | None = None) -> list[ApprovalRun]:
    """The runs whose approval deadline lies before ``now`` (default: the current time)."""
    now_dt = dt.datetime.fromtimestamp(now if now is not None else time.time(), dt.UTC)
    return [r for r in runs if r.deadline is not None and r.deadline < now_dt]


def parse_time(value: str | dt.datetime) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
