"""Operations that keep the three records in step: the lineage store (the truth), the MLflow
registry (aliases for serving and the UI) and git + DVC (files that travel). The CLI and the
nightly flow call these; the store alone is enough to roll back, the others follow when present.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from kedit.lineage.state import LineageError
from kedit.lineage.store import LineageStore
from kedit.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"snapshot_every": 20, "dvc_remote": None, "model_prefix": "kedit",
                            "mlflow": True, "dvc": True}


def lineage_params(ws: Workspace, params_file: str | Path | None = None) -> dict[str, Any]:
    """The ``lineage:`` block of params.yaml (found by :func:`kedit.params.find_params`), over defaults."""
    from kedit.params import load_params

    return {**DEFAULTS, **load_params(params_file, ws).block("lineage")}


def open_store(ws: Workspace, params: dict[str, Any] | None = None) -> LineageStore:
    params = params or lineage_params(ws)
    return LineageStore(ws.lineage_dir, snapshot_every=int(params["snapshot_every"]))


def _versioning(ws: Workspace, params: dict[str, Any]):
    from kedit.lineage.versioning import Versioning

    return Versioning(ws, remote=params.get("dvc_remote"))


def _registry(ws: Workspace, slug: str, params: dict[str, Any]):
    from kedit.lineage.registry import ModelRegistry, Tracking

    return ModelRegistry(Tracking(ws), slug, prefix=params.get("model_prefix") or "")


def register_candidate(ws: Workspace, store: LineageStore, state_id: str, run_id: str | None = None,
                       params: dict[str, Any] | None = None) -> Any:
    """Register a committed state as a version of ``<prefix>-<slug>`` with the ``candidate`` alias."""
    params = params or lineage_params(ws)
    s = store.get(state_id)
    v = _versioning(ws, params)
    git = v.git("rev-parse", "HEAD", check=False) if v.initialised else None
    return _registry(ws, s.base_model_slug, params).register(
        s, store.state_dir(s.id), run_id=run_id, dvc_rev=v.dvc_rev() if v.initialised else None, git_commit=git)


def _follow(ws: Workspace, store: LineageStore, state_id: str | None, message: str,
            params: dict[str, Any], mlflow: bool, dvc: bool) -> dict[str, Any]:
    """After the store moved the champion: tag the files in git + DVC, then move the MLflow alias."""
    out: dict[str, Any] = {"champion": state_id}
    if dvc and params.get("dvc", True) and state_id:
        from kedit.lineage.versioning import state_tag

        info = _versioning(ws, params).tag_state(state_id, message)
        out.update(info, tag=state_tag(state_id))
    if mlflow and params.get("mlflow", True) and state_id:
        s = store.get(state_id)
        reg = _registry(ws, s.base_model_slug, params)
        if reg.version_of(s.id) is None:
            reg.register(s, store.state_dir(s.id), dvc_rev=out.get("dvc_rev.lineage"),
                         git_commit=out.get("git_commit"))
        elif out.get("git_commit"):
            reg._tag(reg.version_of(s.id).version, out.get("dvc_rev.lineage"), out.get("git_commit"))
        mv = reg.set_alias("champion", s.id)
        out.update(registered_model=reg.name, version=mv.version)
    return out


def promote(ws: Workspace, store: LineageStore, state_id: str, by: str, comment: str = "",
            mlflow: bool = True, dvc: bool = True, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Champion becomes ``state_id``: an event in the store, a git tag, the MLflow ``champion`` alias."""
    params = params or lineage_params(ws)
    sid = store.resolve(state_id)
    ev = store.promote(sid, by=by, comment=comment)
    out = _follow(ws, store, sid, f"kedit: promote state {sid[:12]} ({by}: {comment})", params, mlflow, dvc)
    return {"event": ev.to_dict(), **out}


def rollback(ws: Workspace, store: LineageStore, state_id: str | None, by: str, reason: str,
             mlflow: bool = True, dvc: bool = True, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Champion becomes an earlier state (``None`` or ``base``: the base model). The next nightly run
    continues from it with its editor state (``store.materialise(store.champion(), lm)``)."""
    params = params or lineage_params(ws)
    sid = None if state_id in (None, "base") else store.resolve(state_id)
    ev = store.rollback(sid, by=by, reason=reason)
    label = sid[:12] if sid else "base"
    out = _follow(ws, store, sid, f"kedit: rollback to state {label} ({by}: {reason})", params, mlflow, dvc)
    return {"event": ev.to_dict(), **out}


def export(ws: Workspace, store: LineageStore, state_id: str | None, out_dir: str | Path,
           force: bool = False) -> Path:
    """Write a HuggingFace model directory of ``state_id`` (base model + replayed deltas) for serving."""
    from dataclasses import asdict

    from kedit.atomic import write_json_atomic
    from kedit.models.store import load_model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    s = store.get(state_id) if state_id else None
    slug = s.base_model_slug if s else None
    if slug is None:
        raise LineageError("export: name a state (the base model itself is in models/<slug>/)")
    lm = load_model(slug, ws)
    if lm.manifest.model_hash != s.base_model_hash:
        raise LineageError(f"export: models/{slug} has hash {lm.manifest.model_hash[:12]}, state {s.short} "
                           f"was made on {s.base_model_hash[:12]}")
    store.materialise(s.id, lm)
    tmp = out.parent / f".{out.name}.exporting"
    shutil.rmtree(tmp, ignore_errors=True)
    lm.model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "kedit_state.json", {"state": s.to_dict(), "base_model": asdict(lm.manifest)})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def render_show(store: LineageStore, state_id: str) -> str:
    """A state's record and its events as indented JSON (``kedit lineage show``)."""
    s = store.get(state_id)
    evs = [e.to_dict() for e in store.events() if e.state == s.id]
    return json.dumps({"state": s.to_dict(), "events": evs, "champion": store.champion() == s.id,
                       "children": [c.id for c in store.children(s.id)]}, indent=2, sort_keys=True)
