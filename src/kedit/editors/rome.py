"""ROME with the r-ROME fix: one layer, one rank-one update per request, using the prefix-averaged
key k* (the same key v* was optimised for). Requests of a batch share one batched v* optimisation
and are then written one after another, each correcting for the updates before it."""

from __future__ import annotations

import time

import torch

from kedit.editors.base import EditorState, EditRequest, EditResult
from kedit.editors.common import (
    EditCaches,
    apply_layer_delta,
    as_key_stats,
    check_requests,
    check_state,
    weights_restored,
)
from kedit.editors.context import context_prefixes
from kedit.editors.hparams import EditHparams
from kedit.editors.keys import SubjectStates
from kedit.editors.linalg import rome_sequential_update
from kedit.editors.prompts import subject_rows
from kedit.editors.vstar import VStar, vstar_for


class ROMEEditor:
    method = "rome"

    def __init__(self, hparams: EditHparams, cache_dir=None, progress=None) -> None:
        self.hp = hparams
        self.cache_dir = cache_dir
        self.progress = progress

    def compute(self, lm, requests: list[EditRequest], state: EditorState | None = None,
                stats=None, vstar: VStar | None = None, caches: EditCaches | None = None) -> EditResult:
        """``vstar``: a v* already optimised for these requests (a solver sweep reuses one); ``caches``:
        the run's prefix cache (an :class:`~kedit.editors.session.EditSession` passes its own)."""
        t0 = time.perf_counter()
        check_requests(requests)
        hp = self.hp
        layers = hp.resolve_layers(lm.adapter.num_layers)
        if len(layers) != 1:
            raise ValueError(f"ROME edits one layer; hparams give {layers} (set rome.layers: [L])")
        layer = layers[0]
        state = check_state(state, self.method, layers, lm.manifest.model_hash)
        ks = as_key_stats(stats, layers, lm.adapter.key_dim())
        prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, self.cache_dir,
                                    None if caches is None else caches.prefixes)
        vs = vstar_for(lm, requests, prefixes, hp, layer, vstar, progress=self.progress)
        with weights_restored(lm, layers):
            states = SubjectStates(lm, subject_rows(lm.tokenizer, requests, prefixes), layer, layer)
            K = states.read(lm, [layer])[0][layer]  # [d_key, n]; keys do not depend on this layer's W
            # one rank-one update per request, in order, each correcting for the earlier ones
            total = rome_sequential_update(ks.mom2[layer].to(K.device), K, vs.delta.T.to(torch.float64))
            stored = apply_layer_delta(lm, layer, total)
            _, z_after = states.read(lm, [], begin=layer)
        miss = (vs.v0.T + vs.delta.T.double() - z_after).norm(dim=0) / vs.delta.double().norm(dim=1).clamp_min(1e-12)
        new_state = state
        new_state.meta.update(n_edits=int(state.meta.get("n_edits", 0)) + len(requests),
                              n_batches=int(state.meta.get("n_batches", 0)) + 1,
                              hparams_sha256=hp.source_sha256, stats_key=ks.key)
        info = {f"L{layer}": {"update_norm": float(total.norm()), "rank": float(torch.linalg.matrix_rank(total, rtol=1e-9)),
                              "key_norm": float(K.norm(dim=0).mean())},
                "z": {"relative_residual_after": float(miss.mean())}}
        return EditResult(deltas={lm.adapter.weight_name(layer): stored.detach().cpu()}, state=new_state,
                          diagnostics=vs.diagnostics, layer_info=info, seconds=time.perf_counter() - t0, vstar=vs)
