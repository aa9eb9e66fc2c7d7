"""A lineage state fabricated without an editor: the conftest's ``fabricate`` fixture and the worker
processes of the shared-stack test (which cannot receive fixtures) use this one function."""

from __future__ import annotations

import torch

EDITED_LAYERS = (1, 2)


def fabricate(lm, prev, seed: int, rows: list[str], layers=EDITED_LAYERS):
    """A rank-2 update on the MLP output of ``layers`` and an AlphaEdit-like Σ K Kᵀ state that accumulates."""
    from kedit.editors.base import EditorState, EditResult

    g = torch.Generator().manual_seed(seed)
    deltas, tensors = {}, {}
    for i in layers:
        w = lm.adapter.weight(i)
        out_dim, key_dim = w.shape
        k = torch.randn(key_dim, 2, generator=g)
        r = torch.randn(out_dim, 2, generator=g) * 0.05
        deltas[lm.adapter.weight_name(i)] = lm.adapter.to_stored(r @ k.T)
        name = f"cache_c.{i}"
        base = prev.tensors[name] if prev and name in prev.tensors else torch.zeros(key_dim, key_dim)
        tensors[name] = base + k @ k.T
    n_prev = prev.meta.get("n_edits", 0) if prev else 0
    state = EditorState("alphaedit", tensors, {"n_edits": n_prev + len(rows), "layers": list(layers)})
    return EditResult(deltas=deltas, state=state, diagnostics=[])
