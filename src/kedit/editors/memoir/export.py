"""What an exported model directory ships for a memory state (read by the shipped
``modeling_kedit_added.py``, which computes what :func:`kedit.editors.memoir.read.attach` does)."""

from __future__ import annotations

import torch

from kedit.editors.base import EditorState
from kedit.editors.memoir.read import exact_read_scale, read_scale
from kedit.editors.memoir.state import BG, BLOCK_U, BLOCK_V, EXACT, MASKS, METHOD, PERM, SPAN, SPAN_ON, W


def export_added(lm, state: EditorState) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """What an exported directory adds for this state: the memory's settings and tensors, in the form
    the shipped ``modeling_kedit_added.py`` reads (None: no entries yet)."""
    t = state.tensors
    if MASKS not in t or t[MASKS].shape[0] == 0:
        return None
    layer = int(state.meta["layer"])
    spec = {"method": METHOD, "layer": layer, "module": lm.adapter.mlp_out_name(layer),
            "k": int(state.meta["k"]), "threshold": float(state.meta["threshold"]),
            "n_entries": int(t[MASKS].shape[0]), "d": int(t[W].shape[1]), "d_out": int(t[W].shape[0]),
            "facts": list(state.meta.get("entry_owner", [])), "read": state.meta.get("read", "shared")}
    if lm.adapter.residual_out_name(layer) != spec["module"]:  # a norm after the MLP: the change goes after it
        spec["add_module"] = lm.adapter.residual_out_name(layer)
    tensors = {"W": t[W], "masks": t[MASKS], "bg_mean": t[BG], "perm": t[PERM]}
    if EXACT in t:  # each entry's exact key, read at its own (strict) threshold
        spec["exact_threshold"] = float(state.meta["exact_threshold"])
        tensors["exact"] = t[EXACT]
    if SPAN_ON in t and bool(t[SPAN_ON].any()):  # span keys: the token before must match too
        spec["span_threshold"] = float(state.meta["span_threshold"])
        tensors.update(span=t[SPAN], span_on=t[SPAN_ON])
    if read_scale(state) != 1.0 or exact_read_scale(state) != 1.0:  # reads add this share of the block
        spec.update(read_scale=read_scale(state), exact_read_scale=exact_read_scale(state))
    if spec["read"] == "own":  # each entry's own block, as factors
        spec["rank"] = int(t[BLOCK_U].shape[2])
        tensors.update(block_u=t[BLOCK_U], block_v=t[BLOCK_V])
    return spec, tensors
