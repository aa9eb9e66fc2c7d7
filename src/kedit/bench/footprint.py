"""Memory growth of an edit: the bytes everything an edit run adds to the base model takes.

Weight editors add summed deltas (fixed size: one tensor per edited matrix, however many edits) and
a fixed-size state (AlphaEdit's Σ K Kᵀ); editors that add parameters (patches, residual memories,
masks) keep them in the editor state, which grows with every edit. The report gives both parts,
their sum per edit, and the state's growth per edit past the first batch (0 for fixed-size state).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kedit.editors.base import EditorState


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Storage of the tensors' elements (``numel * element_size``; no file or container overhead)."""
    return sum(int(t.numel()) * t.element_size() for t in tensors.values())


def state_bytes(state: EditorState | None) -> int:
    return 0 if state is None else tensor_bytes(state.tensors)


def edit_footprint(deltas: Mapping[str, torch.Tensor], state: EditorState | None, n_edits: int,
                   state_bytes_first: int | None = None, edits_first: int | None = None) -> dict:
    """``delta_bytes``, ``state_bytes``, ``added_bytes`` (their sum) and ``added_bytes_per_edit``
    (``added_bytes / n_edits``); with the state's size after the first batch of ``edits_first`` edits,
    also ``state_growth_bytes_per_edit`` = (final - first) / (n_edits - edits_first), the marginal cost
    of one more edit."""
    if n_edits <= 0:
        raise ValueError(f"edit_footprint: n_edits must be positive, got {n_edits}")
    d, s = tensor_bytes(deltas), state_bytes(state)
    out = {"delta_bytes": d, "state_bytes": s, "added_bytes": d + s, "added_bytes_per_edit": (d + s) / n_edits,
           "state_growth_bytes_per_edit": None}
    if state_bytes_first is not None and edits_first is not None and n_edits > edits_first:
        out["state_growth_bytes_per_edit"] = (s - state_bytes_first) / (n_edits - edits_first)
    return out
