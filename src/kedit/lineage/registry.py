"""MLflow side of the lineage: nightly parent run with nested child runs, and a registered model per
base model with one version per candidate state. Promotion and rollback move the ``candidate`` /
``champion`` aliases; versions are never deleted, so every state stays auditable in the MLflow UI.

MLflow is imported lazily (it takes a second) and the tracking store defaults to SQLite inside the
workspace (the MLflow 3 file store is deprecated); ``MLFLOW_TRACKING_URI`` points it at a server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.lineage.state import (
    BASE,
    EDITOR_META_FILE,
    EDITOR_TENSORS_FILE,
    STATE_FILE,
    EditState,
    LineageError,
)
from kedit.workspace import Workspace

EXPERIMENT = "kedit-nightly"
TAG_STATE = "kedit.state_id"
TAG_PARENT = "kedit.parent_state"
TAG_DVC = "kedit.dvc_rev"
TAG_GIT = "kedit.git_commit"
TAG_BASE = "kedit.base_model_hash"


def model_name(slug: str, prefix: str = "kedit") -> str:
    """Registered model name for a base model, e.g. ``kedit-smollm2-135m``."""
    return f"{prefix}-{slug}" if prefix else slug


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


@dataclass
class Tracking:
    """A workspace's MLflow tracking store and experiment (artifacts kept inside the workspace)."""

    ws: Workspace
    experiment: str = EXPERIMENT

    def __post_init__(self) -> None:
        mlflow = _mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = self.ws.mlflow_uri
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            art = (self.ws.root / "mlartifacts").resolve()
            art.mkdir(parents=True, exist_ok=True)
            self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=art.as_uri())
        else:
            self.experiment_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=self.experiment_id)

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
            nested: bool = False) -> Iterator[Any]:
        """A run (nested under the active one if ``nested``): the nightly refresh parent, or a stage child."""
        mlflow = _mlflow()
        with mlflow.start_run(run_name=name, experiment_id=self.experiment_id, nested=nested,
                              tags=tags) as r:
            if params:
                mlflow.log_params({k: _param(v) for k, v in params.items()})
            yield r

    def child(self, name: str, **kw) -> contextlib.AbstractContextManager:
        """A child run (validation, tracing, editing, evaluation) under the active nightly run."""
        return self.run(name, nested=True, **kw)


def _param(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 500 else s[:497] + "..."


class ModelRegistry:
    """One registered model per base model; one version per candidate edit state."""

    def __init__(self, tracking: Tracking, slug: str, prefix: str = "kedit") -> None:
        self.tracking = tracking
        self.client = tracking.client
        self.name = model_name(slug, prefix)
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(
                self.name, description=f"kedit edit states of base model {slug}: each version holds one "
                                       f"state's deltas, editor state and record; see `kedit lineage log`")

    def versions(self) -> list[Any]:
        vs = self.client.search_model_versions(f"name='{self.name}'")
        return sorted(vs, key=lambda v: int(v.version))

    def version_of(self, state_id: str) -> Any | None:
        for v in self.versions():
            if v.tags.get(TAG_STATE) == state_id:
                return v
        return None

    def register(self, state: EditState, state_dir: Path, run_id: str | None = None,
                 dvc_rev: str | None = None, git_commit: str | None = None) -> Any:
        """Log a state's deltas, editor state and record as artifacts and register them as a version.

        Idempotent: a state already registered returns its version. The new version gets the
        ``candidate`` alias. Logs into ``run_id`` (e.g. the nightly editing child run) or a new run.
        """
        existing = self.version_of(state.id)
        if existing is not None:
            self._tag(existing.version, dvc_rev, git_commit)
            return existing
        mlflow = _mlflow()
        ctx = (mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) if run_id
               else mlflow.start_run(run_name=f"register-{state.short}", experiment_id=self.tracking.experiment_id,
                                     nested=mlflow.active_run() is not None))
        with ctx as r, tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "state"
            folder.mkdir()
            for name in sorted(state.files) + [STATE_FILE]:
                if name in (STATE_FILE, EDITOR_META_FILE, EDITOR_TENSORS_FILE) or name.startswith("deltas"):
                    shutil.copy2(state_dir / name, folder / name)
            artifact_path = f"states/{state.short}"
            mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
            mlflow.log_metrics({"n_edits": float(state.n_edits), "depth": float(state.depth)})
            source = f"{r.info.artifact_uri}/{artifact_path}"
            run = r.info.run_id
        mv = self.client.create_model_version(
            self.name, source=source, run_id=run,
            tags={TAG_STATE: state.id, TAG_PARENT: state.parent or "base", TAG_BASE: state.base_model_hash,
                  "kedit.method": state.method, "kedit.n_edits": str(state.n_edits)},
            description=f"edit state {state.id}")
        self._tag(mv.version, dvc_rev, git_commit)
        self.client.set_registered_model_alias(self.name, "candidate", mv.version)
        return self.client.get_model_version(self.name, mv.version)

    def _tag(self, version: str, dvc_rev: str | None, git_commit: str | None) -> None:
        if dvc_rev:
            self.client.set_model_version_tag(self.name, version, TAG_DVC, dvc_rev)
        if git_commit:
            self.client.set_model_version_tag(self.name, version, TAG_GIT, git_commit)

    def set_alias(self, alias: str, state_id: str) -> Any:
        """Point ``alias`` (candidate / champion) at the version of ``state_id`` (moving, never deleting)."""
        v = self.version_of(state_id)
        if v is None:
            raise LineageError(f"state {state_id[:12]} has no version in registered model {self.name}; "
                               f"register it first")
        self.client.set_registered_model_alias(self.name, alias, v.version)
        return v

    def alias(self, alias: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def register_base(self, slug: str, base_model_hash: str) -> Any:
        """A version standing for the base model itself (no deltas), so ``champion`` can point at it.

        A rollback to the base model moves the alias here rather than deleting it: a server that
        resolves ``models:/<name>@champion`` then gets the base model (a record with no deltas), where
        a missing alias would leave it on whatever it loaded last. Idempotent per base model hash."""
        for v in self.versions():
            if v.tags.get(TAG_STATE) == BASE and v.tags.get(TAG_BASE) == base_model_hash:
                return v
        mlflow = _mlflow()
        import json

        with mlflow.start_run(run_name=f"register-base-{slug}", experiment_id=self.tracking.experiment_id,
                              nested=mlflow.active_run() is not None) as r, tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "base"
            folder.mkdir()
            (folder / "base.json").write_text(json.dumps(
                {"state": None, "base_model_slug": slug, "base_model_hash": base_model_hash,
                 "deltas": {}, "note": "the base model itself: no edit state, no deltas"}, indent=2))
            mlflow.log_artifacts(str(folder), artifact_path="base")
            source, run = f"{r.info.artifact_uri}/base", r.info.run_id
        mv = self.client.create_model_version(
            self.name, source=source, run_id=run, tags={TAG_STATE: BASE, TAG_BASE: base_model_hash},
            description=f"the base model {slug} ({base_model_hash[:12]}) with no edits")
        return self.client.get_model_version(self.name, mv.version)

    def set_alias_version(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)
