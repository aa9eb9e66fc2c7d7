"""Bringing a memory written by an older version up to date.

Each setting the memory gained after states were already written is read from an older state as the
state had it, and only span keys need the facts' prompts to be added later:

- no ``read`` in meta: the shared read (``W'[:, M_e]``, MEMOIR's), as written then
  (:func:`kedit.editors.memoir.read.reads_own_block`);
- no read shares (``read_scale``, ``read_scale_by_entries``, ``exact_read_scale``): every read full
  (:func:`kedit.editors.memoir.read.read_scale`);
- no ``mm.exact``: no exact keys; the next batch written gives the old entries their masks as exact keys;
- no ``mm.span``: no entry is guarded; the next batch leaves the old entries unguarded, and
  :func:`with_span_keys` (called on resume by the editor's ``upgrade``) computes them from the facts' requests;
- no ``mm.vstar``: no warm start from those entries (their objects unknown).
"""

from __future__ import annotations

import torch

from kedit.editors import attach as _attach
from kedit.editors.base import EditorState, EditRequest
from kedit.editors.context import context_prefixes
from kedit.editors.hparams import MemoirHparams
from kedit.editors.memoir.state import METHOD, SPAN, SPAN_ON
from kedit.editors.memoir.write import span_keys


def with_span_keys(lm, state: EditorState, requests: list[EditRequest], hp: MemoirHparams, cache_dir=None
                   ) -> EditorState:
    """A memory written before span keys, with them added: ``requests`` are its facts in entry order
    (``entry_owner``); masks, blocks and exact keys are unchanged."""
    owners = list(state.meta.get("entry_owner", []))
    ids = [str(r.id if r.id is not None else r.text) for r in requests]
    if ids != owners:
        raise ValueError(f"memoir: the requests ({len(ids)}) are not the memory's facts in entry order "
                         f"({len(owners)} entries)")
    prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, cache_dir)
    new = state.copy()
    keys, on = [], []
    with _attach.suspended(lm.model, METHOD):
        for i in range(0, len(requests), 256):
            kk, oo = span_keys(lm, requests[i: i + 256], prefixes, state, int(state.meta["layer"]),
                               int(state.meta["k"]))
            keys.append(kk), on.append(oo)
    new.tensors[SPAN] = torch.cat(keys) if keys else torch.zeros(0, int(state.meta["k"]), dtype=torch.long)
    new.tensors[SPAN_ON] = torch.cat(on) if on else torch.zeros(0, dtype=torch.bool)
    new.meta = {**state.meta, "span_threshold": hp.mm_span_threshold}
    return new
