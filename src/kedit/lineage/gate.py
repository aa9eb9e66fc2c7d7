"""Gate any lineage state against its parent and record the verdict (`kedit lineage gate STATE`).

The nightly refresh gates the candidates it makes; a state made outside it (a retraction by
:mod:`kedit.lineage.retract`) needs the same verdict before `kedit lineage promote` accepts it. This
runs the refresh's promotion gate on the state (:func:`kedit.evaluation.candidate.gate_candidate`,
the one recipe both use): the parent is the "champion" side, the checks and thresholds are the
``gates:`` and ``drift:`` blocks of params.yaml, the reports are the refresh's gate.json / gate.md /
gate.png, and the verdict is recorded against the parent (the one the promotion
rules count). A retraction has no new edits, so the edit checks are skipped; what it must show instead
is that the retracted fact's prompt no longer gives the retracted object (the ``retraction`` check).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kedit.config import RefreshConfig
from kedit.evaluation.candidate import RETRACTION_CHECK, gate_candidate  # noqa: F401 (the check's name, kept here)
from kedit.lineage.access import lineage_params
from kedit.lineage.runlog import RunLog
from kedit.lineage.state import BASE, LineageError
from kedit.lineage.store import LineageStore
from kedit.workspace import Workspace


@dataclass
class StateGate:
    """What gating one state found and where it went: the verdict, the report folder, the lineage event."""

    state_id: str
    parent: str | None  # what it was compared with (None: the base model)
    passed: bool
    report_dir: Path
    event_seq: int
    checks: list[dict] = field(default_factory=list)
    failed_ids: list = field(default_factory=list)
    lost_ids: list = field(default_factory=list)
    retracted: list[str] = field(default_factory=list)
    mlflow_model_id: str | None = None


def gate_target(store: LineageStore, state_ref: str) -> str:
    """The full id of the state to gate; the base model and the champion are refused (nothing to promote)."""
    if state_ref == BASE:
        raise LineageError("the base model has no parent to be gated against and is never promoted: "
                           "gate an edit state (see `kedit lineage log`)")
    sid = store.resolve(state_ref)
    if sid == store.champion():
        raise LineageError(f"state {sid[:12]} is the champion already: the gate compares a candidate with its "
                           f"parent before a promotion; gate one of its children instead (see `kedit lineage log`)")
    return sid


def gate_report_dir(ws: Workspace, state_id: str) -> Path:
    """``reports/state-<id[:16]>/gate``: beside the refresh's ``reports/<refresh key>/gate``."""
    from kedit.safepath import check_target

    d = ws.reports_dir / f"state-{state_id[:16]}" / "gate"
    check_target(d, ws, "gate report", within=ws.root, stores=False)  # no link may lead the report elsewhere
    return d


def gate_state(ws: Workspace, store: LineageStore, state_ref: str, by: str = "kedit-gate",
               mlflow: bool | None = None) -> StateGate:
    """Gate ``state_ref`` against its parent, write the reports, record the verdict, log to MLflow.

    ``mlflow``: log the candidate as an MLflow model with its gate (None: as params.yaml's
    ``lineage.mlflow`` says, like the refresh)."""
    sid = gate_target(store, state_ref)
    state = store.get(sid)
    cfg = RefreshConfig.from_params(workspace=ws, model=state.base_model_slug)
    on = bool(lineage_params(ws).get("mlflow", True)) if mlflow is None else mlflow
    runlog = RunLog(ws, f"state-{sid[:16]}", name="lineage-gate", kind="lineage-gate") if on else None
    try:
        res = gate_candidate(ws, store, sid, cfg, gate_report_dir(ws, sid), runlog=runlog, by=by)
    except BaseException:
        if runlog is not None:
            runlog.finish("FAILED")
        raise
    if runlog is not None:
        runlog.finish()
    v = res.verdict
    return StateGate(state_id=sid, parent=state.parent, passed=bool(v["passed"]), report_dir=res.report_dir,
                     event_seq=res.event_seq, checks=v["checks"], failed_ids=v["failed_ids"],
                     lost_ids=v["lost_ids"], retracted=res.retracted, mlflow_model_id=res.mlflow_model_id)
