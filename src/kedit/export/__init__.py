"""Exported model directories of edit states whose editor *added* parameters (T-Patcher, memory).

A weight editor's state is a plain HuggingFace directory. An added-capacity state also needs its
extra computation, so the directory ships its own code (``configuration_kedit_added.py`` /
``modeling_kedit_added.py``, from :mod:`kedit.export.remote`, importing only torch and transformers)
and ``auto_map`` in ``config.json``: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads the base architecture's class subclassed with the added tensors (saved beside the base weights
as ``kedit_added.*``) and the same forward hook kedit attaches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.editors.base import EditorState

REMOTE_DIR = Path(__file__).parent / "remote"
CONFIG_FILE, MODELING_FILE = "configuration_kedit_added.py", "modeling_kedit_added.py"
MODEL_TYPE = "kedit_added"
PREFIX = "kedit_added."


@dataclass
class AddedParameters:
    """What an exported directory adds to the base model: ``spec`` (config.kedit_added) and tensors."""

    spec: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def added_parameters(lm, state: EditorState | None) -> AddedParameters | None:
    """The state's added tensors and where they act; None for a state that adds nothing (weight
    editors, the base model, an added-capacity state with no entries yet)."""
    if state is None:
        return None
    if state.method == "tpatcher":
        from kedit.editors import tpatcher as T

        p = T.patches_of(state)
        if p is None or p.n == 0:
            return None
        layer = int(state.meta["layer"])
        spec = {"method": "tpatcher", "layer": layer, "module": lm.adapter.mlp_name(layer), "n": p.n,
                "d_in": int(p.key.shape[1]), "d_out": int(p.value.shape[1])}
        return AddedParameters(spec, {"key": p.key, "bias": p.bias, "value": p.value})
    if state.method == "memoir":
        from kedit.editors import memoir as M

        t = state.tensors
        if M.MASKS not in t or t[M.MASKS].shape[0] == 0:
            return None
        layer = int(state.meta["layer"])
        spec = {"method": "memoir", "layer": layer, "module": lm.adapter.mlp_out_name(layer),
                "k": int(state.meta["k"]), "threshold": float(state.meta["threshold"]),
                "n_entries": int(t[M.MASKS].shape[0]), "d": int(t[M.W].shape[1]), "d_out": int(t[M.W].shape[0]),
                "facts": list(state.meta.get("entry_owner", [])), "read": state.meta.get("read", "shared")}
        tensors = {"W": t[M.W], "masks": t[M.MASKS], "bg_mean": t[M.BG], "perm": t[M.PERM]}
        if M.EXACT in t:  # each entry's exact key, read at its own (strict) threshold
            spec["exact_threshold"] = float(state.meta["exact_threshold"])
            tensors["exact"] = t[M.EXACT]
        if M.SPAN_ON in t and bool(t[M.SPAN_ON].any()):  # span keys: the token before must match too
            spec["span_threshold"] = float(state.meta["span_threshold"])
            tensors.update(span=t[M.SPAN], span_on=t[M.SPAN_ON])
        if M.read_scale(state) != 1.0 or M.exact_read_scale(state) != 1.0:  # reads add this share of the block
            spec.update(read_scale=M.read_scale(state), exact_read_scale=M.exact_read_scale(state))
        if spec["read"] == "own":  # each entry's own block, as factors
            spec["rank"] = int(t[M.BLOCK_U].shape[2])
            tensors.update(block_u=t[M.BLOCK_U], block_v=t[M.BLOCK_V])
        return AddedParameters(spec, tensors)
    return None


def _remote_source(name: str, marker: str, value: str) -> str:
    """A shipped module's text with its base-class line set to ``value`` (refused if the line moved)."""
    src = (REMOTE_DIR / name).read_text()
    line = next((ln for ln in src.splitlines() if ln.startswith(f"{marker} = ")), None)
    if line is None:
        raise RuntimeError(f"{REMOTE_DIR / name} has no '{marker} = ...' line to set")
    return src.replace(line, f'{marker} = "{value}"  # the edited model\'s base architecture', 1)


def save_with_added(lm, added: AddedParameters, out: Path) -> None:
    """``save_pretrained`` of ``lm`` plus the added tensors, the shipped code and ``auto_map``."""
    import transformers

    model_cls, config_cls = type(lm.model).__name__, type(lm.model.config).__name__
    for name in (model_cls, config_cls):
        if not hasattr(transformers, name):
            raise ValueError(f"export: transformers has no top-level {name}, so the shipped code cannot "
                             f"subclass it")
    state_dict = {**lm.model.state_dict(),
                  **{PREFIX + n: t.detach().to("cpu").contiguous() for n, t in added.tensors.items()}}
    lm.model.save_pretrained(out, state_dict=state_dict)
    (out / CONFIG_FILE).write_text(_remote_source(CONFIG_FILE, "BASE_CONFIG_CLASS", config_cls))
    (out / MODELING_FILE).write_text(_remote_source(MODELING_FILE, "BASE_MODEL_CLASS", model_cls))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(model_type=MODEL_TYPE, architectures=["KeditAddedForCausalLM"], kedit_added=added.spec,
               auto_map={"AutoConfig": "configuration_kedit_added.KeditAddedConfig",
                         "AutoModelForCausalLM": "modeling_kedit_added.KeditAddedForCausalLM"})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
