"""AlphaEdit: MEMIT's residual spreading, with each layer's update projected onto the null space
of the preserved keys (P = U Uᵀ, U = C's small-eigenvalue eigenvectors; solved in that basis) and the keys of every
earlier batch accumulated in the state (Σ K_p K_pᵀ) so later batches keep earlier edits."""

from __future__ import annotations

import torch

from kedit.editors.base import EditorState
from kedit.editors.common import EditCaches, as_key_stats, cache_name, projector
from kedit.editors.linalg import alphaedit_update_reduced
from kedit.editors.memit import MultiLayerEditor


class AlphaEditEditor(MultiLayerEditor):
    method = "alphaedit"

    def accumulates(self) -> bool:
        return True

    def solve(self, lm, layer: int, K, R, state: EditorState, stats, info: dict,
              caches: EditCaches | None = None) -> torch.Tensor:
        hp = self.hp
        U, rank = projector(stats, layer, lm.manifest.model_hash, hp.nullspace_threshold, hp.nullspace_mode,
                            None if caches is None else caches.projectors)
        info["nullspace_dim"] = float(rank)
        prev = state.tensors.get(cache_name(layer))
        C = stats.mom2[layer].to(K.device) if hp.nullspace_mom2_weight else None
        return alphaedit_update_reduced(U.to(K.device), K, R, None if prev is None else prev.to(K.device), hp.L2,
                                        C, hp.nullspace_mom2_weight)


def prepare(lm, hp, stats, layers: list[int], caches: EditCaches) -> dict[int, int]:
    """Each layer's null-space basis, computed once into ``caches`` before the first batch (a
    benchmark times it as one-time work); returns each layer's null-space dimension."""
    ks = as_key_stats(stats, layers, lm.adapter.key_dim())
    return {i: projector(ks, i, lm.manifest.model_hash, hp.nullspace_threshold, hp.nullspace_mode,
                         caches.projectors)[1] for i in layers}
