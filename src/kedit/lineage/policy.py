"""When a state may become champion: the promotion and rollback rules, as pure functions of the events.

Promotion of state S needs, in the event log:

1. a gate verdict recorded for S *against its parent* (the model the gate compared it with), and the
   latest such verdict passed (``{"passed": true}``);
2. after that verdict, an ``approve`` event for S, and no later ``reject``.

A rollback may go to the base model, to a state that was champion before, or to an ancestor of one
(its edits are a prefix of approved edits). Anything else is a promotion by another name.

With ``lineage.require_distinct_approver`` (params.yaml), the approval must also come from an account
other than the promoter's: neither the approval's ``by`` nor its actor's identity may be one of the
promoter's (:func:`kedit.lineage.identity.accounts`).

Either rule can be overridden only with a reason, which the store records as an ``override`` event
naming the rules that were not met. The store checks these rules when it writes the event, so every
path (CLI, Prefect flow, Python API) meets the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kedit.lineage.identity import accounts
from kedit.lineage.state import EditState, Event, LineageError


class PromotionRefused(LineageError):
    """The rules for a new champion are not met (the message lists which, and how to override)."""


@dataclass
class Check:
    """What a rule check found: ``unmet`` is empty when the move is allowed; the events it relied on."""

    unmet: list[str] = field(default_factory=list)
    gate_event: int | None = None
    approval_event: int | None = None

    @property
    def ok(self) -> bool:
        return not self.unmet


def gate_passed(gate: dict | None) -> bool:
    return isinstance(gate, dict) and gate.get("passed") is True


def promotion_check(events: Sequence[Event], state: EditState, promoter: set[str] | None = None) -> Check:
    """The promotion rules for ``state`` over ``events`` (oldest first); ``promoter``: the promoter's
    account names when the approver must be someone else (None: no such rule)."""
    check = Check()
    mine = [e for e in events if e.state == state.id]
    parent = state.parent
    gates = [e for e in mine if e.type == "gate" and "against" in e.data]
    own = [e for e in gates if e.data.get("against") == parent]
    if not own:
        other = sorted({str(e.data.get("against") or "base")[:12] for e in gates})
        why = f" (verdicts recorded against {', '.join(other)} only)" if other else ""
        check.unmet.append(f"no gate verdict for {state.short} against its parent "
                           f"{(parent or 'base')[:12]}{why}")
        return _approval(check, mine, state, after=None, promoter=promoter)
    last = own[-1]
    check.gate_event = last.seq
    if not gate_passed(last.data.get("gate")):
        check.unmet.append(f"gate verdict for {state.short} FAILED (event {last.seq} by {last.by})")
    return _approval(check, mine, state, after=last.seq, promoter=promoter)


def _approval(check: Check, mine: list[Event], state: EditState, after: int | None,
              promoter: set[str] | None = None) -> Check:
    decisions = [e for e in mine if e.type in ("approve", "reject") and (after is None or e.seq > after)]
    if after is None:  # without a gate verdict an approval cannot have seen it
        decisions = []
    if not decisions:
        check.unmet.append(f"no approval of {state.short} recorded after its gate verdict "
                           f"(`kedit lineage approve {state.short}`)")
    elif decisions[-1].type == "reject":
        r = decisions[-1]
        check.unmet.append(f"{state.short} was rejected by {r.by} (event {r.seq}: {r.comment})")
    else:
        a = decisions[-1]
        same = sorted(accounts(a.by, a.actor) & promoter) if promoter else []
        if same:
            check.unmet.append(f"{state.short} was approved by {', '.join(same)} (event {a.seq}), who may not also "
                               f"promote it (lineage.require_distinct_approver): another account must promote")
        else:
            check.approval_event = a.seq
    return check


def rollback_check(events: Sequence[Event], states: dict[str, EditState], target: str | None) -> Check:
    """A rollback target must be the base model, a former champion, or an ancestor of one."""
    if target is None:
        return Check()
    champions = {e.state for e in events if e.type in ("promote", "rollback") and e.state}
    allowed: set[str] = set()
    for sid in champions:
        while sid is not None and sid not in allowed:
            allowed.add(sid)
            s = states.get(sid)
            sid = s.parent if s else None
    if target in allowed:
        return Check()
    return Check(unmet=[f"{target[:12]} was never champion nor an ancestor of one: making it champion is a "
                        f"promotion (gate + approval), not a rollback"])


def refusal(action: str, state_id: str | None, check: Check) -> PromotionRefused:
    label = state_id[:12] if state_id else "base"
    return PromotionRefused(f"{action} {label} refused: " + "; ".join(check.unmet)
                            + ". Override only with a reason (`--force --reason WHY`), recorded as an override event")
