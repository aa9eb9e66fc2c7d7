"""Edit requests in and edit results out: JSON/JSONL request files (kedit's own fields or flat
CounterFact records) and an edit directory (deltas + state as safetensors, the rest as JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kedit.atomic import save_tensors_atomic, write_json_atomic
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


def save_edit(out_dir: str | Path, result: EditResult, extra: dict[str, Any] | None = None) -> Path:
    """``deltas.safetensors``, ``state.safetensors`` + ``state.json`` and ``result.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(out / DELTAS, result.deltas)
    save_tensors_atomic(out / STATE, result.state.tensors or {"_empty": torch.zeros(0)})
    write_json_atomic(out / STATE_META, {"method": result.state.method, "meta": result.state.meta})
    write_json_atomic(out / RESULT, {"diagnostics": [asdict(d) for d in result.diagnostics],
                                     "layer_info": result.layer_info, "seconds": result.seconds, **(extra or {})})
    return out


def load_deltas(edit_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(edit_dir) / DELTAS
    if not path.exists():
        raise FileNotFoundError(f"{edit_dir}: no {DELTAS} (not a `kedit edit` output directory)")
    return load_file(str(path))


def load_state(edit_dir: str | Path) -> EditorState:
    from safetensors.torch import load_file

    d = Path(edit_dir)
    if not (d / STATE_META).exists():
        raise FileNotFoundError(f"{edit_dir}: no {STATE_META} (not a `kedit edit` output directory)")
    meta = json.loads((d / STATE_META).read_text())
    tensors = {k: v for k, v in load_file(str(d / STATE)).items() if k != "_empty"}
    return EditorState(method=meta["method"], tensors=tensors, meta=meta["meta"])
