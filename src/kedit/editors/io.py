"""Edit requests in and edit results out: JSON/JSONL request files (kedit's own fields or flat
CounterFact records) and an edit directory (deltas + state as safetensors, the rest as JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kedit.atomic import save_tensors_atomic, sha256_file, write_json_atomic
from kedit.editors.base import EditorState, EditRequest, EditResult

DELTAS = "deltas.safetensors"
STATE = "state.safetensors"
STATE_META = "state.json"
RESULT = "result.json"


def request_from_record(rec: dict[str, Any], where: str = "record") -> EditRequest:
    """kedit fields (prompt with ``{}``) or flat CounterFact (subject written out in ``prompt``)."""
    try:
        prompt, subject, target = rec["prompt"], rec["subject"], rec["target_new"]
    except KeyError as exc:
        raise ValueError(f"{where}: missing field {exc.args[0]!r} (need prompt, subject, target_new)") from None
    if isinstance(target, dict):  # original CounterFact nesting
        target = target.get("str", "")
    if "{}" not in prompt:
        if subject not in prompt:
            raise ValueError(f"{where}: prompt {prompt!r} contains neither '{{}}' nor the subject {subject!r}")
        prompt = prompt.replace(subject, "{}", 1)
    paraphrases = rec.get("paraphrases") or ([rec["rephrase_prompt"]] if rec.get("rephrase_prompt") else [])
    neighbors = rec.get("neighbors") or ([rec["locality_prompt"]] if rec.get("locality_prompt") else [])
    rid = rec.get("id", rec.get("case_id"))
    return EditRequest(prompt=prompt, subject=subject, target_new=str(target),
                       target_true=rec.get("target_true", rec.get("ground_truth")),
                       paraphrases=list(paraphrases), neighbors=list(neighbors),
                       id=None if rid is None else str(rid))


def load_records(path: str | Path) -> list[dict]:
    from kedit.records import read_records

    return read_records(path, "requests")


def load_requests(path: str | Path) -> list[EditRequest]:
    return [request_from_record(r, f"{path} record {i}") for i, r in enumerate(load_records(path))]


class EditDirError(ValueError):
    """A `kedit edit` directory whose files are damaged, truncated or changed since it was written."""


def save_edit(out_dir: str | Path, result: EditResult, extra: dict[str, Any] | None = None) -> Path:
    """``deltas.safetensors``, ``state.safetensors`` + ``state.json`` and ``result.json`` in ``out_dir``;
    ``result.json`` records the other files' sha256 (``files``), checked when the directory is read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(out / DELTAS, result.deltas)
    save_tensors_atomic(out / STATE, result.state.tensors or {"_empty": torch.zeros(0)})
    write_json_atomic(out / STATE_META, {"method": result.state.method, "meta": result.state.meta})
    files = {name: sha256_file(out / name) for name in (DELTAS, STATE, STATE_META)}
    write_json_atomic(out / RESULT, {"diagnostics": [asdict(d) for d in result.diagnostics],
                                     "layer_info": result.layer_info, "seconds": result.seconds, **(extra or {}),
                                     "files": files})
    return out


def _checked(edit_dir: str | Path, name: str) -> Path:
    """``edit_dir/name`` after checking it against the sha256 ``result.json`` recorded (directories written
    before kedit recorded them are read unchecked); :class:`EditDirError` names the file."""
    d = Path(edit_dir)
    path = d / name
    if not path.exists():
        raise FileNotFoundError(f"{edit_dir}: no {name} (not a `kedit edit` output directory)")
    try:
        recorded = json.loads((d / RESULT).read_text()).get("files") or {} if (d / RESULT).exists() else {}
    except (ValueError, AttributeError) as exc:
        raise EditDirError(f"{d / RESULT}: not readable JSON ({exc}); the edit directory is damaged") from None
    want = recorded.get(name)
    if want is not None:
        got = sha256_file(path)
        if got != want:
            raise EditDirError(f"{path}: sha256 {got[:12]} does not match the {want[:12]} recorded in "
                               f"{d / RESULT} ({path.stat().st_size:,} bytes): the file is damaged or was "
                               f"changed after `kedit edit` wrote it")
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or :class:`EditDirError` naming it (truncated, not safetensors, NaN)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        raise EditDirError(f"{path}: not a readable safetensors file ({exc}); the edit directory is damaged") \
            from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise EditDirError(f"{path}: tensor(s) {bad[:5]} hold NaN or infinite values; the edit directory is damaged")
    return tensors


def load_deltas(edit_dir: str | Path) -> dict[str, torch.Tensor]:
    return _tensors(_checked(edit_dir, DELTAS))


def load_state(edit_dir: str | Path) -> EditorState:
    d = Path(edit_dir)
    meta_path = _checked(d, STATE_META)
    try:
        meta = json.loads(meta_path.read_text())
        method, state_meta = meta["method"], meta["meta"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EditDirError(f"{meta_path}: not an editor state record ({exc!r}); the edit directory is damaged") \
            from None
    tensors = {k: v for k, v in _tensors(_checked(d, STATE)).items() if k != "_empty"}
    return EditorState(method=method, tensors=tensors, meta=state_meta)
