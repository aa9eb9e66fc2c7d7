"""The MLflow runs of one refresh (or one ``kedit lineage gate``): a parent run keyed by the refresh
key, a child run per step, and the candidate logged as a loadable MLflow model on the parent run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kedit.lineage.access import lineage_params
from kedit.lineage.registry import Tracking, log_state_model
from kedit.lineage.store import LineageStore
from kedit.workspace import Workspace


class RunLog:
    """MLflow runs for one refresh: a parent run keyed by the refresh key, a child run per step.

    Runs are found again by tag, so a resumed or retried refresh logs into the same runs.
    """

    def __init__(self, ws: Workspace, refresh_key: str, name: str = "nightly-refresh", kind: str = "refresh") -> None:
        self.tracking = Tracking(ws)
        self.client = self.tracking.client
        self.key = refresh_key
        self.parent_id = self._find_or_create(name, {"kedit.refresh": refresh_key, "kedit.kind": kind})

    def _find_or_create(self, name: str, tags: dict[str, str]) -> str:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = self.client.search_runs([self.tracking.experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.tracking.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def child(self, step: str) -> str:
        return self._find_or_create(step, {"kedit.refresh": self.key, "kedit.step": step,
                                           "mlflow.parentRunId": self.parent_id})

    def log(self, step: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
            artifacts: Sequence[str | Path] = (), tags: dict[str, str] | None = None) -> str:
        run_id = self.child(step)
        for k, v in (params or {}).items():
            s = str(v)
            try:
                self.client.log_param(run_id, k, s[:497] + "..." if len(s) > 500 else s)
            except Exception:  # a param is immutable once logged (resumed run): keep the first value
                pass
        for k, v in (metrics or {}).items():
            if v is not None and isinstance(v, int | float):
                self.client.log_metric(run_id, k, float(v))
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, str(v))
        for a in artifacts:
            if a and Path(a).exists():
                if Path(a).is_dir():
                    self.client.log_artifacts(run_id, str(a), artifact_path=step)
                else:
                    self.client.log_artifact(run_id, str(a), artifact_path=step)
        return run_id

    def finish(self, status: str = "FINISHED") -> None:
        for r in self.client.search_runs([self.tracking.experiment_id],
                                         filter_string=f"tags.`kedit.refresh` = '{self.key}'"):
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, status=status)


def log_candidate_model(ws: Workspace, store: LineageStore, state_id: str, runlog: RunLog, gate_dir: Path) -> str | None:
    """Every candidate, passed or failed, becomes a loadable MLflow model on the refresh's run, with its
    gate metrics, verdict and report (``lineage.mlflow: false`` in params.yaml turns this off)."""
    if not lineage_params(ws).get("mlflow", True):
        return None
    logged = log_state_model(runlog.tracking, store, store.get(state_id), run_id=runlog.parent_id,
                             gate_dir=gate_dir)
    return logged.model_id
