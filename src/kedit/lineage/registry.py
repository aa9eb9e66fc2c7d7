"""MLflow side of the lineage: nightly parent run with nested child runs, and a registered model per
base model with one version per candidate state. Promotion and rollback move the ``candidate`` /
``champion`` aliases; versions are never deleted, so every state stays auditable in the MLflow UI.

MLflow is imported lazily (it takes a second) and the tracking store defaults to SQLite inside the
workspace (the MLflow 3 file store is deprecated); ``MLFLOW_TRACKING_URI`` points it at a server.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.lineage.state import (
    BASE,
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
TAG_GATE = "kedit.gate"  # the gate verdict of a candidate: passed / failed
TAG_KIND = "kedit.kind"
TAG_GATE_REPORT = "kedit.gate_report"  # the artifact URI of the candidate's gate.md (inside its logged model)
TAG_REVIEW = "kedit.review"  # approved / rejected, and who, when, why: the reviewer's verdict
TAG_REVIEWER = "kedit.reviewer"
TAG_REVIEWED_AT = "kedit.reviewed_at"
TAG_REVIEW_COMMENT = "kedit.review_comment"
STATE_MODEL = "edit-state"  # name of each state's logged MLflow model
BASE_ARTIFACT = "base_model"


def model_name(slug: str, prefix: str = "kedit") -> str:
    """Registered model name for a base model, e.g. ``kedit-smollm2-135m``."""
    return f"{prefix}-{slug}" if prefix else slug


def import_mlflow():
    """mlflow, imported with its telemetry off (kedit runs with no network)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


@dataclass
class Tracking:
    """A workspace's MLflow tracking store and experiment (artifacts kept inside the workspace)."""

    ws: Workspace
    experiment: str = EXPERIMENT

    def __post_init__(self) -> None:
        mlflow = import_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = self.ws.mlflow_uri
        # MLflow 3 also writes the URI into $MLFLOW_TRACKING_URI, which Workspace.mlflow_uri reads first:
        # left there, every later workspace in this process (a long-lived worker, a test run) would
        # track into this one's store. Keep the process environment as it was.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        self.client = MlflowClient(self.uri)
        try:
            exp = self.client.get_experiment_by_name(self.experiment)
        except Exception as exc:  # a server that is down: MLflow raises after its own retries
            if not self.uri.startswith(("http://", "https://")):
                raise
            raise LineageError(f"MLflow tracking server {self.uri} is not answering ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200]}); nothing was logged or registered. Start it, "
                               f"or unset MLFLOW_TRACKING_URI to use the workspace's own store") from exc
        if exp is None:
            self.experiment_id = self.client.create_experiment(self.experiment,
                                                               artifact_location=artifact_root(self.ws, self.uri))
        else:
            check_artifact_location(self.ws, self.uri, exp.artifact_location)
            self.experiment_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=self.experiment_id)

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
            nested: bool = False) -> Iterator[Any]:
        """A run (nested under the active one if ``nested``): the nightly refresh parent, or a stage child."""
        mlflow = import_mlflow()
        with mlflow.start_run(run_name=name, experiment_id=self.experiment_id, nested=nested,
                              tags=tags) as r:
            if params:
                mlflow.log_params({k: _param(v) for k, v in params.items()})
            yield r

    def child(self, name: str, **kw) -> contextlib.AbstractContextManager:
        """A child run (validation, tracing, editing, evaluation) under the active nightly run."""
        return self.run(name, nested=True, **kw)


def artifact_root(ws: Workspace, tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: inside the workspace under a workspace-relative URI
    (``kedit-workspace:/mlartifacts``) when the tracking store is the workspace's own SQLite file, so
    the workspace stays valid when copied or moved; a tracking server's own artifact root otherwise
    (None: e.g. ``mlflow-artifacts:/`` of a server that proxies artifacts)."""
    from kedit.workspace_artifacts import ARTIFACT_DIR, ROOT_URI, sqlite_file

    db = sqlite_file(tracking_uri)
    if db is None or db.parent != ws.root:
        return None
    (ws.root / ARTIFACT_DIR).mkdir(parents=True, exist_ok=True)
    return ROOT_URI


def check_artifact_location(ws: Workspace, tracking_uri: str, location: str) -> None:
    """Refuse an experiment whose absolute ``file://`` artifact location lies outside this workspace (a
    workspace made by an older kedit, then copied or moved): reading it would load, and writing it
    would change, another folder's artifacts. One inside the workspace works but is not portable."""
    import logging

    from kedit.lineage.mlflow_model import local_path
    from kedit.workspace_artifacts import is_workspace_uri, sqlite_file

    if is_workspace_uri(location):
        return
    path = local_path(location or "")
    db = sqlite_file(tracking_uri)
    if path is None or db is None or db.parent != ws.root:
        return
    path = path.resolve()
    if ws.root not in path.parents and path != ws.root:
        raise LineageError(
            f"{tracking_uri}: MLflow experiment keeps its artifacts at {path}, outside this workspace "
            f"{ws.root}: the workspace was made by an older kedit (absolute artifact paths) and then copied "
            f"or moved, so its models would load from (and log into) the other folder. Use the workspace in "
            f"its original place, or start this copy's MLflow store afresh (move mlflow.db and mlartifacts/ "
            f"aside); the lineage itself does not depend on them")
    logging.getLogger(__name__).warning(
        "%s: MLflow artifacts at the absolute path %s (a workspace made by an older kedit): it works here "
        "but will not when the workspace is copied or moved", ws.root, path)


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
                 dvc_rev: str | None = None, git_commit: str | None = None, store: Any = None) -> Any:
        """Register a state's logged MLflow model (see :func:`log_state_model`) as a version.

        Idempotent: a state already registered returns its version. The new version gets the
        ``candidate`` alias. A state not logged yet is logged into ``run_id`` (e.g. the nightly run)
        or a new run. The version's source is the logged model, so ``models:/<name>@<alias>`` loads.
        """
        existing = self.version_of(state.id)
        if existing is not None:
            self._tag(existing.version, dvc_rev, git_commit)
            return existing
        if store is None:
            from kedit.lineage.store import LineageStore

            store = LineageStore(Path(state_dir).parent.parent)
        logged = find_state_model(self.tracking, state.id) or log_state_model(self.tracking, store, state, run_id)
        tags = {TAG_STATE: state.id, TAG_PARENT: state.parent or "base", TAG_BASE: state.base_model_hash,
                "kedit.method": state.method, "kedit.n_edits": str(state.n_edits)}
        for tag in (TAG_GATE, TAG_GATE_REPORT):
            if logged.tags.get(tag):
                tags[tag] = logged.tags[tag]
        mv = self.client.create_model_version(
            self.name, source=logged.model_uri, run_id=logged.source_run_id, tags=tags, model_id=logged.model_id,
            description=f"edit state {state.id} (parent {state.parent or 'base'}, {state.n_edits} edits)")
        self.client.update_model_version(self.name, mv.version,
                                         description=version_description(self.client.get_model_version(self.name, mv.version)))
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
        """A version standing for the base model itself (no edit state), so ``champion`` can point at it.

        A rollback to the base model moves the alias here rather than deleting it: a server that
        resolves ``models:/<name>@champion`` then loads the base model (the same pyfunc as every state,
        with no state to restore; see :func:`log_base_model`), where a missing alias would leave it on
        whatever it loaded last. Idempotent per base model hash; a base version registered before the
        base was a loadable model (its source a plain folder) is left for the audit trail and a loadable
        one is registered beside it."""
        for v in self.versions():
            if (v.tags.get(TAG_STATE) == BASE and v.tags.get(TAG_BASE) == base_model_hash
                    and str(v.source).startswith("models:/")):
                return v
        logged = log_base_model(self.tracking, slug, base_model_hash)
        mv = self.client.create_model_version(
            self.name, source=logged.model_uri, run_id=logged.source_run_id, model_id=logged.model_id,
            tags={TAG_STATE: BASE, TAG_BASE: base_model_hash},
            description=f"the base model {slug} ({base_model_hash[:12]}) with no edits")
        return self.client.get_model_version(self.name, mv.version)

    def set_alias_version(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def clear_alias(self, alias: str, state_id: str) -> bool:
        """Remove ``alias`` if it points at ``state_id``'s version (True: it did and is gone)."""
        have = self.alias(alias)
        if have is None or have.tags.get(TAG_STATE) != state_id:
            return False
        self.client.delete_registered_model_alias(self.name, alias)
        return True

    def record_review(self, state_id: str, decision: str, by: str, at: str, comment: str = "") -> Any | None:
        """Put a reviewer's verdict on ``state_id``'s version, where the MLflow UI shows it: tags (who,
        when, why, approved / rejected) and a description naming the gate verdict and its report. A
        rejected candidate loses the ``candidate`` alias. None: the state has no version."""
        v = self.version_of(state_id)
        if v is None:
            return None
        tags = {TAG_REVIEW: decision, TAG_REVIEWER: by, TAG_REVIEWED_AT: at, TAG_REVIEW_COMMENT: comment or "-"}
        for k, val in tags.items():
            self.client.set_model_version_tag(self.name, v.version, k, val)
        v = self.client.get_model_version(self.name, v.version)
        self.client.update_model_version(self.name, v.version, description=version_description(v))
        if decision != "approved":
            self.clear_alias("candidate", state_id)
        return self.client.get_model_version(self.name, v.version)


def version_description(v: Any) -> str:
    """A model version's description (markdown) from its tags: the state, the gate verdict with a link
    to its report, the reviewer's verdict."""
    t = v.tags
    lines = [f"edit state `{t.get(TAG_STATE, '?')}` (parent `{t.get(TAG_PARENT, '?')}`, "
             f"{t.get('kedit.n_edits', '?')} edits, {t.get('kedit.method', '?')})", ""]
    gate = t.get(TAG_GATE)
    report = t.get(TAG_GATE_REPORT)
    lines.append(f"**Gate: {gate.upper() if gate else 'not recorded'}**"
                 + (f"; report: `{report}` (`mlflow artifacts download -u {report}`)" if report else ""))
    if t.get(TAG_REVIEW):
        lines += ["", f"**{t[TAG_REVIEW].capitalize()}** by {t.get(TAG_REVIEWER)} at {t.get(TAG_REVIEWED_AT)}: "
                      f"{t.get(TAG_REVIEW_COMMENT, '-')}"]
    return "\n".join(lines)


def log_refresh_inputs(tracking: Tracking, run_id: str, params: dict[str, Any], rows: list[dict[str, Any]],
                       name: str, source: str, digest: str) -> None:
    """On a refresh's parent run: its parameters and the feed's accepted rows as an MLflow dataset
    (context ``feed``; ``source``: the feed file, ``kedit-workspace:/feeds/<file>`` inside the
    workspace), so the run says what it was asked to do and on which data. Idempotent: a resumed
    refresh logs the same values again."""
    import json

    import pandas as pd
    from mlflow.exceptions import MlflowException

    mlflow = import_mlflow()
    cols = ["id", "subject", "prompt", "target_new", "target_true", "relation", "paraphrases", "neighbors"]
    df = pd.DataFrame([{c: (json.dumps(r.get(c)) if isinstance(r.get(c), list | dict) else r.get(c))
                        for c in cols} for r in rows], columns=cols).astype("string")
    dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36])
    with _run_ctx(tracking, run_id, name):
        for k, v in params.items():
            try:
                mlflow.log_param(k, _param(v))
            except MlflowException:  # already logged with another value (a resumed run): keep the first
                pass
        mlflow.log_input(dataset, context="feed")


# --- each candidate state as a logged MLflow model ---------------------------------------------------
@contextlib.contextmanager
def _run_ctx(tracking: Tracking, run_id: str | None, name: str) -> Iterator[Any]:
    """The run to log into: ``run_id`` (resumed, and left RUNNING if it was: the nightly run goes on
    after registration), else a new one; nested when another run is active."""
    mlflow = import_mlflow()
    nested = mlflow.active_run() is not None
    if not run_id:
        with mlflow.start_run(run_name=name, experiment_id=tracking.experiment_id, nested=nested) as r:
            yield r
        return
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    was = tracking.client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, nested=nested) as r:
        yield r
    if was == "RUNNING":
        tracking.client.update_run(run_id, status="RUNNING")


def logged_base_model_uri(tracking: Tracking, model_hash: str) -> str | None:
    """URI of the base model folder if it is already logged (a run of kind ``base-model``), else None."""
    query = f"tags.`{TAG_KIND}` = 'base-model' and tags.`{TAG_BASE}` = '{model_hash}'"
    found = tracking.client.search_runs([tracking.experiment_id], filter_string=query, max_results=1)
    return f"{found[0].info.artifact_uri}/{BASE_ARTIFACT}" if found else None


def base_model_uri(tracking: Tracking, model_dir: Path, model_hash: str) -> str:
    """URI of the base model folder, logged once per model hash (a run of kind ``base-model``), so each
    state's model references it instead of carrying another full copy of the weights."""
    found = logged_base_model_uri(tracking, model_hash)
    if found:
        return found
    mlflow = import_mlflow()
    with _run_ctx(tracking, None, f"base-model-{Path(model_dir).name}") as r:
        mlflow.set_tags({TAG_KIND: "base-model", TAG_BASE: model_hash})
        mlflow.log_artifacts(str(model_dir), artifact_path=BASE_ARTIFACT)
        return f"{r.info.artifact_uri}/{BASE_ARTIFACT}"


def find_state_model(tracking: Tracking, state_id: str) -> Any | None:
    """The logged MLflow model of an edit state, if there is one."""
    found = tracking.client.search_logged_models([tracking.experiment_id],
                                                 filter_string=f"tags.`{TAG_STATE}` = '{state_id}'", max_results=1)
    return found[0] if found else None


def gate_of(store: Any, state_id: str) -> dict | None:
    """The last gate verdict recorded for a state (the store's ``gate`` event), if any."""
    gates = [e.data.get("gate") for e in store.events() if e.type == "gate" and e.state == state_id]
    return gates[-1] if gates else None


def edited_facts_table(state: EditState) -> dict[str, list]:
    """The facts a state applied, one column per field, with the edited model's recorded answer."""
    facts = state.feed.get("facts") or []
    preds = state.predictions or {}
    cols: dict[str, list] = {k: [] for k in ("id", "subject", "prompt", "target_true", "target_new", "answer")}
    for f in facts:
        text = str(f.get("prompt", "")).replace("{}", str(f.get("subject", "")))
        for k in ("id", "subject", "target_true", "target_new"):
            cols[k].append("" if f.get(k) is None else str(f.get(k)))
        cols["prompt"].append(text)
        cols["answer"].append(preds.get(text, ""))
    return cols


SERVE_REQUIREMENTS = ("torch", "transformers", "safetensors", "numpy", "pandas", "pyyaml", "mlflow")
INPUT_EXAMPLE = ["The Eiffel Tower is located in the city of"]


def public_version(v: str) -> str:
    """A version without its local tag (``2.13.0+cpu`` -> ``2.13.0``): a local tag names one build on
    one index, which an environment built elsewhere (``mlflow models serve --env-manager uv``) lacks."""
    return v.split("+", 1)[0]


def _requirements() -> list[str]:
    """What loading a state imports, pinned to the versions installed here, without local tags (kedit
    itself travels as the model's code, see :func:`_log_pyfunc`). Pinned explicitly: MLflow's
    inference would import torchvision (absent) and fail."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in SERVE_REQUIREMENTS:
        try:
            out.append(f"{pkg}=={public_version(version(pkg))}")
        except PackageNotFoundError:
            continue
    return out


def _stage_code(dest: Path) -> str:
    """A copy of the kedit package (sources and data, no caches) for the model's ``code_paths``: the
    model then loads where kedit is not installed (an environment MLflow builds to serve it)."""
    import shutil

    import kedit

    src = Path(kedit.__file__).parent
    shutil.copytree(src, dest / "kedit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dest / "kedit")


def _log_pyfunc(root: Path, config: dict[str, Any], tags: dict[str, str], metadata: dict[str, Any]) -> Any:
    """Log the pyfunc (kedit's entry point, ``root`` as its workspace artifact) into the active run,
    with kedit's code, requirements without local version tags and an input example (MLflow checks at
    logging time that the example serves: one load and one prediction)."""
    import json

    from kedit.lineage import pyfunc_entry as entry
    from kedit.lineage.mlflow_model import ARTIFACT, CONFIG_FILE, signature

    mlflow = import_mlflow()
    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    with tempfile.TemporaryDirectory() as code, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hint.*")  # the signature is explicit (max_new_tokens)
        return mlflow.pyfunc.log_model(
            name=STATE_MODEL, python_model=str(Path(entry.__file__)), artifacts={ARTIFACT: str(root)},
            code_paths=[_stage_code(Path(code))], pip_requirements=_requirements(), tags=tags,
            signature=signature(), input_example=(INPUT_EXAMPLE, {"max_new_tokens": 4}), metadata=metadata)


def find_base_model(tracking: Tracking, base_model_hash: str) -> Any | None:
    """The logged pyfunc model of the base model itself (no edit state), if there is one."""
    query = f"tags.`{TAG_STATE}` = '{BASE}' and tags.`{TAG_BASE}` = '{base_model_hash}'"
    found = tracking.client.search_logged_models([tracking.experiment_id], filter_string=query, max_results=1)
    return found[0] if found else None


def log_base_model(tracking: Tracking, slug: str, base_model_hash: str) -> Any:
    """Log the base model as the same pyfunc as an edit state, with no state (an empty lineage path):
    loading it gives the base model exactly. The weights are not copied again: the model references
    the base model logged once per hash (:func:`base_model_uri`). Idempotent per base model hash."""
    from kedit.lineage.mlflow_model import ARTIFACT
    from kedit.models.store import ModelManifest

    existing = find_base_model(tracking, base_model_hash)
    if existing is not None:
        return existing
    model_dir = tracking.ws.model_dir(slug)
    try:
        have = ModelManifest.read(model_dir).model_hash
    except FileNotFoundError:
        have = None
    base_uri = logged_base_model_uri(tracking, base_model_hash)
    if base_uri is None:
        if have != base_model_hash:
            raise LineageError(f"base model {slug} ({base_model_hash[:12]}) is neither logged in MLflow nor in "
                               f"{model_dir} (found {str(have)[:12]}); a loadable MLflow model of the base "
                               f"model needs one of them")
        base_uri = base_model_uri(tracking, model_dir, base_model_hash)
    config = {"state_id": None, "base_model_hash": base_model_hash, "base_model_uri": base_uri,
              "base_model_slug": slug}
    tags = {TAG_STATE: BASE, TAG_BASE: base_model_hash, TAG_KIND: "base-state"}
    with _run_ctx(tracking, None, f"register-base-{slug}"), tempfile.TemporaryDirectory() as tmp:
        info = _log_pyfunc(Path(tmp) / ARTIFACT, config, tags, {"kedit_state": None, "base_model_slug": slug})
    return tracking.client.get_logged_model(info.model_id)


def log_state_model(tracking: Tracking, store: Any, state: EditState, run_id: str | None = None,
                    gate_dir: Path | None = None) -> Any:
    """Log ``state`` as an MLflow pyfunc model (base model reference + its lineage path) into ``run_id``.

    On the logged model: the gate metrics (from ``gate_dir/gate.json``, else the store's gate event),
    the verdict as tag ``kedit.gate``, gate.md / gate.png as artifacts; on the run: the edited facts as
    a table (``edited_facts/<id>.json``). Idempotent: a state already logged returns its model.
    """
    import json

    from kedit.lineage.mlflow_model import ARTIFACT, stage_state_lineage
    from kedit.models.store import ModelManifest

    existing = find_state_model(tracking, state.id)
    if existing is not None:
        return existing
    mlflow = import_mlflow()
    model_dir = tracking.ws.model_dir(state.base_model_slug)
    try:
        have = ModelManifest.read(model_dir).model_hash
    except FileNotFoundError:
        have = None
    if have != state.base_model_hash:
        raise LineageError(f"state {state.short}: its base model {state.base_model_slug} "
                           f"({state.base_model_hash[:12]}) is not in {model_dir} (found {str(have)[:12]}); a "
                           f"loadable MLflow model needs the base model in the model store")
    base_uri = base_model_uri(tracking, model_dir, state.base_model_hash)
    gate_file = Path(gate_dir) / "gate.json" if gate_dir else None
    gate = json.loads(gate_file.read_text()) if gate_file and gate_file.exists() else gate_of(store, state.id)
    tags = {TAG_STATE: state.id, TAG_PARENT: state.parent or "base", TAG_BASE: state.base_model_hash,
            "kedit.method": state.method, "kedit.n_edits": str(state.n_edits)}
    if gate is not None:
        tags[TAG_GATE] = "passed" if gate.get("passed") else "failed"
    config = {"state_id": state.id, "base_model_hash": state.base_model_hash, "base_model_uri": base_uri,
              "base_model_slug": state.base_model_slug}
    with _run_ctx(tracking, run_id, f"state-{state.short}") as r, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / ARTIFACT  # the folder's name is the artifact's path inside the model
        stage_state_lineage(store, state.id, root)
        info = _log_pyfunc(root, config, tags, {"kedit_state": state.id, "parent": state.parent,
                                                "n_edits": state.n_edits})
        run = r.info.run_id
        metrics = {"n_edits": float(state.n_edits), "depth": float(state.depth)}
        for c in (gate or {}).get("checks", []):
            if c.get("value") is not None and not c.get("skipped"):
                metrics[f"gate.{c['name']}"] = float(c["value"])
        mlflow.log_metrics(metrics, run_id=run, model_id=info.model_id)
        facts = edited_facts_table(state)
        if facts["id"]:
            mlflow.log_table(facts, artifact_file=f"edited_facts/{state.short}.json", run_id=run)
    for name in ("gate.md", "gate.png", "gate.json"):
        if gate_dir and (Path(gate_dir) / name).exists():
            tracking.client.log_model_artifact(info.model_id, str(Path(gate_dir) / name), artifact_path="gate")
    if gate_dir and (Path(gate_dir) / "gate.md").exists():
        logged = tracking.client.get_logged_model(info.model_id)
        tracking.client.set_logged_model_tags(info.model_id, {TAG_GATE_REPORT: f"{logged.artifact_location}/gate/gate.md"})
    return tracking.client.get_logged_model(info.model_id)
