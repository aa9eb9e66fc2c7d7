"""Retract one fact from an edit state as a new lineage state, without rewinding later edits.

Added-capacity editors (T-Patcher's patches, the sparse residual memory's entries) keep each fact in
rows of their own, so removing a fact exactly is dropping its rows: the editor's own function in
:attr:`kedit.editors.registry.EditorSpec.retract` does it, and this module only finds the fact, checks it,
and commits the result as a child of the state it was retracted from (a candidate like any other:
it still needs a passed gate and an approval to be promoted). Weight editors (ROME, MEMIT,
AlphaEdit) add every fact into shared weights; exact retraction is impossible there, so the
retraction is refused and an edit back to the old object is offered instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.editors.base import EditResult
from kedit.lineage.identity import current_actor
from kedit.lineage.state import EditState, LineageError
from kedit.lineage.store import LineageStore, check_texts

RETRACTION = "retraction"  # feed["kind"] of a state made by retracting a fact


class RetractionImpossible(LineageError):
    """The fact lives in overwritten weights. ``request`` is the edit back to the old object (None when
    the fact's record has no ``target_true``); ``method`` the weight editor that applied it."""

    def __init__(self, message: str, method: str, request: dict | None) -> None:
        super().__init__(message)
        self.method = method
        self.request = request


@dataclass
class FactOrigin:
    """Where a fact entered a state's path: the state that applied it and its record there (if kept)."""

    fact_id: str
    state: EditState
    record: dict | None


def find_fact(store: LineageStore, state_id: str, fact_id: str) -> FactOrigin:
    """The state on ``state_id``'s path that applied ``fact_id`` (the last one, if it came twice).

    Raises a :class:`LineageError` naming the state when the fact is not applied there (never applied,
    or retracted since)."""
    sid = store.resolve(state_id)
    applied = store.facts(sid)
    if fact_id not in applied:
        known = sorted(applied)
        shown = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
        raise LineageError(f"fact {fact_id!r} is not applied on the path to state {sid[:12]} "
                           f"(facts applied there: {shown or 'none'}; see `kedit lineage show {sid[:12]}`)")
    for s in reversed(store.path(sid)):
        if fact_id in [str(r) for r in s.feed.get("row_ids", []) or []]:
            records = [f for f in s.feed.get("facts", []) or [] if str(f.get("id")) == fact_id]
            return FactOrigin(fact_id, s, records[-1] if records else None)
    raise LineageError(f"fact {fact_id!r}: no state on the path to {sid[:12]} lists it")  # facts() said one does


def edit_back_request(record: dict | None, fact_id: str) -> dict | None:
    """A request that edits the fact's prompt back to its old object (None without ``target_true``)."""
    if not record or not record.get("target_true") or not record.get("prompt") or not record.get("subject"):
        return None
    return {"id": f"{fact_id}-revert", "prompt": record["prompt"], "subject": record["subject"],
            "target_new": record["target_true"], "target_true": record.get("target_new")}


def write_request(request: dict, path: str | Path) -> Path:
    """The request as a one-line JSONL file (what `kedit edit --requests` and a feed file take)."""
    from kedit.atomic import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(request, sort_keys=True) + "\n")
    return path


def retract(store: LineageStore, lm: Any, state_id: str, fact_id: str, by: str, reason: str) -> EditState:
    """Commit a new state, child of ``state_id``, whose editor state no longer holds ``fact_id``.

    ``lm`` is the base model the lineage was made on (a LoadedModel or a bare module; its weights are
    not changed: the new state has no weight deltas). The feed records what happened:
    ``{"kind": "retraction", "retracted": [fact], "from_state": id, "by", "reason", "actor"}``; retracting
    the same fact from the same state again, by the same person for the same reason, returns that state.
    Raises :class:`RetractionImpossible` for a fact applied by a weight editor."""
    if not by or not str(by).strip():
        raise ValueError("retract: say who does it (by=...)")
    if not reason or not str(reason).strip():
        raise ValueError("retract: give a reason")
    check_texts("retract", by, reason=reason)
    fact_id = str(fact_id)
    sid = store.resolve(state_id)
    origin = find_fact(store, sid, fact_id)
    state = store.get(sid)
    if _retracting(origin.state.method) is None:
        request = edit_back_request(origin.record, fact_id)
        offer = ("an edit back to the old object is offered" if request else
                 "its record has no target_true, so no edit back can be offered")
        raise RetractionImpossible(
            f"fact {fact_id!r} was applied by {origin.state.method} in state {origin.state.short}: it was added "
            f"into shared weights together with other facts, so it cannot be removed exactly; {offer}",
            origin.state.method, request)
    if _retracting(state.method) is None:
        raise LineageError(f"fact {fact_id!r} was applied by {origin.state.method} in state {origin.state.short}, "
                           f"but state {sid[:12]} holds a {state.method} editor state, which does not keep it")
    es = store.editor_state(sid)
    spec = _retracting(es.method)
    if spec is None or fact_id not in spec.owners(es):
        raise LineageError(f"fact {fact_id!r} owns no {es.method} row in the editor state of {sid[:12]}")
    new_state = spec.retract(es, fact_id)
    actor = current_actor()  # the account, not host / pid: retracting the same fact again is the same state
    feed = {"kind": RETRACTION, "retracted": [fact_id], "from_state": sid, "by": str(by), "reason": str(reason),
            "actor": {"identity": actor.identity, "os_user": actor.os_user}, "row_ids": []}
    return store.commit(lm, EditResult(deltas={}, state=new_state, diagnostics=[]), parent=sid, feed=feed,
                        hparams=state.hparams, applied=False)


def row_owners(store: LineageStore, state_id: str | None) -> dict[str, Any] | None:
    """``{"method", "owners": [fact per row]}`` of an added-capacity state's editor state, else None."""
    if state_id is None:
        return None
    s = store.get(state_id)
    if _retracting(s.method) is None:
        return None
    es = store.editor_state(s.id)
    spec = _retracting(es.method)
    return None if spec is None else {"method": es.method, "owners": spec.owners(es)}


def _retracting(method: str | None):
    """The spec of ``method`` if it keeps each fact in rows of its own (retract, owners), else None."""
    from kedit.editors.registry import SPECS

    spec = SPECS.get(method) if method else None
    return spec if spec is not None and spec.retractable else None


def owner_diff(a: dict | None, b: dict | None) -> dict[str, Any]:
    """Which fact owns which row, gained and lost between two :func:`row_owners` results (pure).

    ``added``: fact -> its row indices in ``b`` for facts with more rows in ``b`` than in ``a``;
    ``removed``: fact -> its row indices in ``a`` for facts with fewer rows in ``b``."""
    def rows(o: dict | None) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, f in enumerate((o or {}).get("owners", [])):
            out.setdefault(f, []).append(i)
        return out

    ra, rb = rows(a), rows(b)
    facts = sorted(set(ra) | set(rb))
    return {"from_method": (a or {}).get("method"), "to_method": (b or {}).get("method"),
            "rows_from": len((a or {}).get("owners", [])), "rows_to": len((b or {}).get("owners", [])),
            "added": {f: rb[f] for f in facts if len(rb.get(f, [])) > len(ra.get(f, []))},
            "removed": {f: ra[f] for f in facts if len(ra.get(f, [])) > len(rb.get(f, []))}}
