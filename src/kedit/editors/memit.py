"""MEMIT: spread the v* residual over several layers, each solved by least squares against λ·C.

Layers are edited in ascending order; before each, keys and the current output of the last edit
layer are re-read with the partly edited weights, and the layer takes ``(z − current)/(layers left)``.
The weights are restored on return; the deltas say exactly what to add.
"""

from __future__ import annotations

import time

import torch

from kedit.editors.base import EditorState, EditRequest, EditResult
from kedit.editors.common import (
    EditCaches,
    apply_layer_delta,
    as_key_stats,
    cache_name,
    check_requests,
    check_state,
    weights_restored,
)
from kedit.editors.context import context_prefixes
from kedit.editors.hparams import EditHparams
from kedit.editors.keys import SubjectStates, average_by_request
from kedit.editors.linalg import memit_update
from kedit.editors.norm_anchor import anchor_batch
from kedit.editors.prompts import subject_rows
from kedit.editors.vstar import VStar, vstar_for


class MultiLayerEditor:
    """The MEMIT / AlphaEdit skeleton; subclasses supply the per-layer solve."""

    method = "memit"

    def __init__(self, hparams: EditHparams, cache_dir=None, progress=None) -> None:
        self.hp = hparams
        self.cache_dir = cache_dir
        self.progress = progress

    # per-layer solve: K [d_key, n], R [d_out, n] -> Δ [d_out, d_key]
    def solve(self, lm, layer: int, K, R, state: EditorState, stats, info: dict,
              caches: EditCaches | None = None) -> torch.Tensor:
        hp = self.hp
        prev = state.tensors.get(cache_name(layer)) if hp.memit_sequential else None
        return memit_update(stats.mom2[layer].to(K.device), K, R, hp.mom2_update_weight,
                            None if prev is None else prev.to(K.device))

    def accumulates(self) -> bool:
        return self.hp.memit_sequential

    def compute(self, lm, requests: list[EditRequest], state: EditorState | None = None,
                stats=None, vstar: VStar | None = None, caches: EditCaches | None = None) -> EditResult:
        """``vstar``: a v* already optimised for these requests (a solver sweep reuses one); ``caches``:
        the run's projector / prefix caches (an :class:`~kedit.editors.session.EditSession` passes its own)."""
        t0 = time.perf_counter()
        caches = EditCaches() if caches is None else caches
        check_requests(requests)
        hp = self.hp
        layers = hp.resolve_layers(lm.adapter.num_layers)
        state = check_state(state, self.method, layers, lm.manifest.model_hash)
        ks = as_key_stats(stats, layers, lm.adapter.key_dim())
        prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, self.cache_dir,
                                    caches.prefixes)
        per_row = hp.key_mode == "contexts"
        vs = vstar_for(lm, requests, prefixes, hp, layers[-1], vstar, progress=self.progress)
        optimised, diagnostics, anchor_info = vs, vs.diagnostics, None
        if hp.v_norm_anchor:  # NAS: rescale each v* to the base model's mean norm, skip outliers
            anchored = anchor_batch(lm, requests, prefixes, vs, hp, layers[-1], state, ks.dir)
            requests, vs, diagnostics, anchor_info = (anchored.requests, anchored.vstar, anchored.diagnostics,
                                                      anchored.info)
            if not requests:
                return self._nothing_applied(lm, layers, state, ks, diagnostics, anchor_info, optimised, t0)
        z = (vs.v0 + vs.delta.to(torch.float64)).T  # [d, n]
        rows = subject_rows(lm.tokenizer, requests, prefixes)
        row_req = torch.tensor(rows.req, device=z.device)
        # per-context columns carry weight 1/√(contexts of their request): squared errors are averaged
        w = torch.bincount(row_req, minlength=len(requests)).to(torch.float64).rsqrt()[row_req]
        deltas: dict[str, torch.Tensor] = {}
        layer_info: dict[str, dict[str, float]] = {}
        with weights_restored(lm, layers):
            states = SubjectStates(lm, rows, layers[0], layers[-1])
            edit_keys: dict[int, torch.Tensor] = {}
            target = z
            for idx, layer in enumerate(layers):
                # only the layer edited last changed: replay from it (its input is unchanged)
                keys, cur = states.read(lm, [layer], begin=layers[idx - 1] if idx else None, per_row=per_row)
                K = keys[layer]
                if per_row and idx == 0:  # every context's own output plus the δ v* added to it
                    target = cur + vs.delta.to(torch.float64).T[:, row_req]
                R = (target - cur) / (len(layers) - idx)
                if per_row:
                    K, R = K * w, R * w
                edit_keys[layer] = K
                info: dict[str, float] = {}
                upd = self.solve(lm, layer, K, R, state, ks, info, caches=caches)
                stored = apply_layer_delta(lm, layer, upd)
                deltas[lm.adapter.weight_name(layer)] = stored.detach().cpu()
                info.update(update_norm=float(upd.norm()), resid_norm=float(R.norm(dim=0).mean()),
                            key_norm=float(K.norm(dim=0).mean()),
                            weight_norm=float(lm.adapter.weight(layer).detach().double().norm()))
                layer_info[f"L{layer}"] = info
            _, z_after = states.read(lm, [], begin=layers[-1], per_row=per_row)
            if per_row:  # how much of δ each context's output is still missing
                miss_rows = (target - z_after).norm(dim=0) / vs.delta.double().norm(dim=1)[row_req].clamp_min(1e-12)
                layer_info["contexts"] = {"relative_residual_after": float(miss_rows.mean()),
                                          "worst_relative_residual_after": float(miss_rows.max())}
                z_after = average_by_request(z_after.T, row_req, len(requests)).T
        # a layer's key does not depend on its own or later layers' weights, so the keys read before
        # editing each layer are the edited model's keys: they go into the state as they are
        final_keys = edit_keys if self.accumulates() else {}
        miss = (z - z_after).norm(dim=0) / (z - vs.v0.T).norm(dim=0).clamp_min(1e-12)
        layer_info["z"] = {"relative_residual_after": float(miss.mean())}
        if anchor_info is not None:
            layer_info["norm_anchor"] = anchor_info
        new_state = state
        if self.accumulates():
            dt = getattr(torch, hp.cache_dtype)
            for layer, K in final_keys.items():
                prev = new_state.tensors.get(cache_name(layer))
                kk = (K @ K.T).to(dt).cpu()
                new_state.tensors[cache_name(layer)] = kk if prev is None else prev.to(dt) + kk
        new_state.meta.update(n_edits=int(state.meta.get("n_edits", 0)) + len(requests),
                              n_batches=int(state.meta.get("n_batches", 0)) + 1,
                              hparams_sha256=hp.source_sha256, stats_key=ks.key)
        return EditResult(deltas=deltas, state=new_state, diagnostics=diagnostics, layer_info=layer_info,
                          seconds=time.perf_counter() - t0, vstar=optimised)

    def _nothing_applied(self, lm, layers, state, ks, diagnostics, anchor_info, vs, t0) -> EditResult:
        """Every request of the batch was skipped by the norm anchor: zero deltas, the state unchanged
        but for the batch count, and the skipped ids in ``layer_info``."""
        new_state = state
        new_state.meta.update(n_batches=int(state.meta.get("n_batches", 0)) + 1,
                              hparams_sha256=self.hp.source_sha256, stats_key=ks.key)
        deltas = {lm.adapter.weight_name(i): torch.zeros_like(lm.adapter.mlp_out(i).weight).detach().cpu()
                  for i in layers}
        return EditResult(deltas=deltas, state=new_state, diagnostics=diagnostics,
                          layer_info={"norm_anchor": anchor_info}, seconds=time.perf_counter() - t0, vstar=vs)


class MEMITEditor(MultiLayerEditor):
    method = "memit"
