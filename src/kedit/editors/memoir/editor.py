"""The memory as a kedit editor: ``compute`` writes a batch into the memory kept in the editor state
and returns no weight deltas (the base weights never change)."""

from __future__ import annotations

import time

import torch

from kedit.editors import attach as _attach
from kedit.editors.base import EditorState, EditRequest, EditResult
from kedit.editors.common import EditCaches, check_requests
from kedit.editors.context import context_prefixes
from kedit.editors.hparams import MemoirHparams
from kedit.editors.memoir.memory import residual_matrix
from kedit.editors.memoir.migrate import with_span_keys
from kedit.editors.memoir.read import attach
from kedit.editors.memoir.state import (
    BG,
    BLOCK_U,
    BLOCK_V,
    EXACT,
    MASKS,
    METHOD,
    SPAN,
    SPAN_ON,
    VSTAR,
    W,
    check_state,
    initial_state,
)
from kedit.editors.memoir.write import span_keys, write_batch


class MemoirEditor:
    """``compute`` writes a batch into the sparse residual memory; the model's weights never change."""

    method = METHOD

    def __init__(self, hparams: MemoirHparams, cache_dir=None, progress=None) -> None:
        self.hp = hparams
        self.cache_dir = cache_dir
        self.progress = progress
        self.background_texts: list[str] | None = None  # None: the statistics corpus

    def attach(self, lm, state: EditorState) -> _attach.Attachment:
        return attach(lm, state)

    def upgrade(self, lm, state: EditorState, applied: list[EditRequest]) -> EditorState:
        """``state`` with span keys added when these hparams want them and it was written without
        (``applied``: its facts in entry order); otherwise ``state`` itself."""
        if not self.hp.mm_span_key or SPAN in state.tensors or state.method != METHOD:
            return state
        return with_span_keys(lm, state, applied, self.hp, self.cache_dir)

    def compute(self, lm, requests: list[EditRequest], state: EditorState | None = None, stats=None,
                caches: EditCaches | None = None) -> EditResult:
        """``stats`` is not used: the memory needs only its own background mean (kept in the state);
        ``caches``: the run's prefix cache."""
        t0 = time.perf_counter()
        check_requests(requests)
        hp = self.hp
        # a shallow copy: every tensor of the new state is built anew below (cat, W' from a clone), so the
        # caller's state is never written and a large memory is not cloned once per batch
        state = initial_state(lm, hp, self.background_texts) if state is None else \
            EditorState(state.method, dict(state.tensors), dict(state.meta))
        check_state(state, lm, hp)
        layer, k = int(state.meta["layer"]), int(state.meta["k"])
        prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, self.cache_dir,
                                    None if caches is None else caches.prefixes)
        with _attach.suspended(lm.model, METHOD):
            wr = write_batch(lm, requests, prefixes, state, layer, k, hp, self.progress)
            spans = span_keys(lm, requests, prefixes, state, layer, k, wr.before) if hp.mm_span_key else None
        (u, v), masks, exact, diags, vstar = wr.uv, wr.masks, wr.exact, wr.diags, wr.vstar
        owners = [str(r.id if r.id is not None else r.text) for r in requests]
        # a state from before exact keys: its entries' masks stand in for their exact keys
        old_exact = state.tensors.get(EXACT, state.tensors[MASKS])
        new_masks = torch.cat([state.tensors[MASKS], masks.cpu()])
        d = state.tensors[BG].shape[0]
        state.tensors.update({MASKS: new_masks, BLOCK_U: torch.cat([state.tensors[BLOCK_U], u.cpu()]),
                              BLOCK_V: torch.cat([state.tensors[BLOCK_V], v.cpu()]),
                              W: residual_matrix(masks.cpu(), u, v, d, start=state.tensors[W])})
        if hp.mm_exact_key:
            state.tensors[EXACT] = torch.cat([old_exact, exact.cpu()])
            state.meta["exact_threshold"] = hp.mm_exact_threshold
        else:
            state.tensors.pop(EXACT, None)
            state.meta.pop("exact_threshold", None)
        n_old = state.tensors[MASKS].shape[0] - masks.shape[0]
        if spans is not None:  # a memory from before span keys: its entries stay unguarded
            old_keys = state.tensors.get(SPAN, state.tensors[MASKS][:n_old])
            old_on = state.tensors.get(SPAN_ON, torch.zeros(n_old, dtype=torch.bool))
            state.tensors[SPAN] = torch.cat([old_keys, spans[0].cpu()])
            state.tensors[SPAN_ON] = torch.cat([old_on, spans[1].cpu()])
            state.meta["span_threshold"] = hp.mm_span_threshold
        else:
            state.tensors.pop(SPAN, None)
            state.tensors.pop(SPAN_ON, None)
            state.meta.pop("span_threshold", None)
        if hp.mm_warm_start and vstar is not None:  # entries written without it: zeros, object unknown
            old_v = state.tensors.get(VSTAR, torch.zeros(n_old, vstar.shape[1]))
            state.tensors[VSTAR] = torch.cat([old_v, vstar.detach().float().cpu()])
            state.meta["entry_target"] = [*state.meta.get("entry_target", [None] * n_old),
                                          *(r.target_new.strip() for r in requests)]
        else:
            state.tensors.pop(VSTAR, None)
            state.meta.pop("entry_target", None)
        for key in ("read_scale", "read_scale_by_entries", "exact_read_scale"):  # read settings: for every
            state.meta.pop(key, None)  # entry, old and new, as the latest batch's hparams say
        if hp.mm_read_scale_by_entries is not None:
            state.meta["read_scale_by_entries"] = [[int(n), float(s)] for n, s in hp.mm_read_scale_by_entries]
        elif hp.mm_read_scale != 1.0:
            state.meta["read_scale"] = hp.mm_read_scale
        if hp.mm_exact_read_scale is not None and (hp.mm_read_scale_by_entries is not None or hp.mm_read_scale != 1.0
                                                   or hp.mm_exact_read_scale != 1.0):
            state.meta["exact_read_scale"] = hp.mm_exact_read_scale  # absent: exact reads take the mask share
        state.meta.update(entry_owner=[*state.meta["entry_owner"], *owners], threshold=hp.mm_threshold,
                          n_edits=int(state.meta.get("n_edits", 0)) + len(requests),
                          n_batches=int(state.meta.get("n_batches", 0)) + 1, hparams_sha256=hp.source_sha256)
        info = {"memory": {"entries": float(new_masks.shape[0]), "w_norm": float(state.tensors[W].norm()),
                           "warm_started": float(wr.warm),
                           "state_bytes": float(sum(t.numel() * t.element_size() for t in state.tensors.values()))}}
        return EditResult(deltas={}, state=state, diagnostics=diags, layer_info=info,
                          seconds=time.perf_counter() - t0)
