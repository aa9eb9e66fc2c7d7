"""Retraction: a memory without one fact's entries, W' rebuilt from the rest; the other facts keep
their blocks (with the own read their outputs do not change at all)."""

from __future__ import annotations

import torch

from kedit.editors.base import EditorState
from kedit.editors.memoir.memory import residual_matrix
from kedit.editors.memoir.state import BG, BLOCK_U, BLOCK_V, EXACT, MASKS, SPAN, SPAN_ON, VSTAR, W


def retract(state: EditorState, fact_id: str) -> EditorState:
    """A new state without ``fact_id``'s entries (masks and blocks) and with W' recomputed from the rest."""
    owners = list(state.meta.get("entry_owner", []))
    if fact_id not in owners:
        raise KeyError(f"fact {fact_id!r} has no entry in this memory (facts: {sorted(set(owners))[:10]}...)")
    new = select_entries(state, [i for i, o in enumerate(owners) if o != fact_id])
    new.tensors[W] = residual_matrix(new.tensors[MASKS], new.tensors[BLOCK_U], new.tensors[BLOCK_V],
                                     state.tensors[BG].shape[0])
    new.meta = {**new.meta, "n_edits": int(state.meta.get("n_edits", 0)) - 1,
                "retracted": [*state.meta.get("retracted", []), fact_id]}
    return new


def select_entries(state: EditorState, keep: list[int]) -> EditorState:
    """A copy of ``state`` holding only the entries ``keep`` (in that order): their masks, keys, blocks
    and v*, owners and objects. W' is left as it was (rebuild it with :func:`residual_matrix` where the
    shared read needs it)."""
    new = state.copy()
    idx = torch.tensor(keep, dtype=torch.long)
    for key in (MASKS, BLOCK_U, BLOCK_V, EXACT, SPAN, SPAN_ON, VSTAR):
        if key in state.tensors:
            new.tensors[key] = state.tensors[key].index_select(0, idx)
    for key in ("entry_owner", "entry_target"):
        if key in state.meta:
            new.meta[key] = [state.meta[key][i] for i in keep]
    return new
