"""An edit state as a loadable MLflow model: a pyfunc that loads the base model and restores the state.

Why a pyfunc of base + lineage state and not the transformers flavor of an exported directory: the
flavor stores a full copy of the weights per state (538 MB for SmolLM2-135M), the pyfunc stores only
what the state needs on top of the base model (the edited tensors' base values, the deltas since the
nearest snapshot, the editor state: tens of MB) and references the base model, which is logged once
per base-model hash. Measurements in docs/lineage.md.

The model's artifacts are a small lineage store (``workspace/lineage/``) holding the state's path;
loading goes through :func:`kedit.lineage.access.load_state_model`, kedit's own restore, so whatever a
state carries (deltas, editor state, added modules) comes back exactly as the pipeline restores it.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from kedit.lineage.state import SNAPSHOT_FILE, STATE_FILE, LineageError

ARTIFACT = "workspace"  # the pyfunc artifact: a folder holding lineage/ (a small lineage store) and
CONFIG_FILE = "kedit_model.json"  # the state id and where its base model is
DEFAULT_NEW_TOKENS = 8


def stage_state_lineage(store, state_id: str, dest: Path) -> Path:
    """Write what restoring ``state_id`` reads into ``dest/lineage``, a lineage store of its own: the
    records of every state on its path, and for the state itself its deltas, its editor state and a
    snapshot of the edited tensors (verified against the record), so the copy has the same size at
    any depth and ``materialise`` checks it exactly like the original. ``snapshot`` and ``files``
    are bookkeeping outside the content hash: the state keeps its id."""
    import dataclasses

    from kedit.atomic import save_tensors_atomic, sha256_file, write_json_atomic

    target = store.get(state_id)
    root = Path(dest) / "lineage"
    for s in store.path(target.id)[:-1]:
        out = root / "states" / s.id
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(store.state_dir(s.id) / STATE_FILE, out / STATE_FILE)
    out = root / "states" / target.id
    out.mkdir(parents=True, exist_ok=True)
    for n in target.files:
        if n.startswith(("deltas", "editor")):
            shutil.copy2(store.state_dir(target.id) / n, out / n)
    save_tensors_atomic(out / SNAPSHOT_FILE, store.tensors(target.id), metadata={"state": target.id})
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir())}
    write_json_atomic(out / STATE_FILE, dataclasses.replace(target, snapshot=True, files=files).to_dict())
    return root


def signature():
    """Prompts in, greedy continuations out; ``max_new_tokens`` as an inference parameter."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]), outputs=Schema([ColSpec(DataType.string)]),
                          params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, DEFAULT_NEW_TOKENS)]))


def local_path(uri: str) -> Path | None:
    """The folder a ``file://`` or ``kedit-workspace:`` artifact URI names (None for remote stores)."""
    from kedit.workspace_artifacts import is_workspace_uri
    from kedit.workspace_artifacts import local_path as workspace_path

    if is_workspace_uri(uri):
        return workspace_path(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("file", ""):
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kedit`` (default ``~/.cache/kedit``): the caches of a model loaded from MLflow,
    whose artifact folder a local store hands over in place and which must stay as it was logged."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kedit"


def resolve_base_model(config: dict[str, Any]) -> Path:
    """The base model folder logged once in MLflow (``base_model_uri``), read in place when it is local
    (a ``kedit-workspace:`` URI: inside the workspace being read, wherever it lies now), downloaded
    otherwise. A ``base_model_path`` of a model logged by an older kedit is not read: it names a folder
    of the workspace the model was logged in, which a copied workspace must not depend on."""
    from kedit.models.store import ModelManifest

    want = config["base_model_hash"]
    uri = config.get("base_model_uri")
    if not uri:
        raise LineageError(f"base model {want[:12]}: no base_model_uri recorded in the model's {CONFIG_FILE}")
    cand = local_path(uri)
    if cand is not None and not (cand / "kedit_manifest.json").exists():
        raise LineageError(f"base model {want[:12]}: {uri} names {cand}, which holds no model (the workspace "
                           f"it was logged in was moved or deleted?)")
    got = cand if cand is not None else Path(mlflow.artifacts.download_artifacts(uri))
    if ModelManifest.read(got).model_hash != want:
        raise LineageError(f"{uri}: base model hash {ModelManifest.read(got).model_hash[:12]}, the state was "
                           f"made on {want[:12]}")
    return got


class EditStateModel(mlflow.pyfunc.PythonModel):
    """``predict(prompts) -> greedy continuations`` of the base model with one edit state restored
    (``state_id`` null: the base model itself, nothing restored)."""

    def load_context(self, context) -> None:
        from kedit.lineage.access import load_state_model
        from kedit.workspace import Workspace

        root = Path(context.artifacts[ARTIFACT])
        cfg = json.loads((root / CONFIG_FILE).read_text())
        base = resolve_base_model(cfg)
        # a local artifact store hands over its own folder: caches go to the user's, never into the store
        ws = Workspace(root, cache_root=user_cache_dir())
        device = cfg.get("device") or os.environ.get("KEDIT_DEVICE") or "cpu"
        self.lm, self.editor_state = load_state_model(ws, str(base), cfg["state_id"], device=device)
        self.state_id = cfg["state_id"]

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        """Greedy continuation of each prompt (a list of strings or a one-column DataFrame).

        ``pd.DataFrame`` is what MLflow hands over under the logged column signature, and a hint MLflow
        infers no signature from: a hint such as ``list[str]`` would make it replace the explicit
        signature, dropping its ``max_new_tokens`` param. A plain list still works when called directly."""
        from kedit.models.scoring import greedy_tokens

        if hasattr(model_input, "iloc"):
            model_input = model_input.iloc[:, 0].tolist()
        prompts = [str(p) for p in model_input]
        if not prompts:
            return []
        k = int((params or {}).get("max_new_tokens", DEFAULT_NEW_TOKENS))
        toks = greedy_tokens(self.lm, prompts, k=k)
        return [self.lm.tokenizer.decode(t, skip_special_tokens=True) for t in toks.tolist()]
