"""A memory's editor state: the names of its tensors, where it sits (:func:`memory_layer`), an empty
one (:func:`initial_state`) and the check that a state fits the settings and model it is used with.

State (``EditorState.tensors``): ``mm.W`` (W', float32 ``[d_out, d]``), ``mm.masks`` (int64 ``[entries, k]``),
``mm.exact`` (int64 ``[entries, k]``, the exact keys), ``mm.block_u`` / ``mm.block_v`` (float32
``[entries, d_out, r]`` / ``[entries, r, k]``, each entry's block as ``U V``: ``r = contexts`` for the closed
form, ``r = k`` for Adam), ``mm.bg_mean`` (float32 ``[d]``), ``mm.perm`` (int64 ``[d]``), ``mm.span`` /
``mm.span_on`` (int64 ``[entries, k]`` / bool ``[entries]``, the span keys and which entries have one),
``mm.vstar`` (float32 ``[entries, d_out]``, each entry's v*, with ``mm_warm_start``). ``meta``: ``layer``,
``k``, ``rank``, ``read``, ``threshold``, ``exact_threshold``, ``span_threshold``, the read shares
(``read_scale`` or ``read_scale_by_entries``, and ``exact_read_scale``; absent at 1.0), ``entry_owner`` (fact id
per entry), ``entry_target`` (new object per entry, with ``mm_warm_start``) and the edit counters.
States written by older versions may lack some of these: :mod:`kedit.editors.memoir.migrate` lists how
each is read and brought up to date.
"""

from __future__ import annotations

from itertools import islice

import torch

from kedit.editors import attach as _attach
from kedit.editors.base import EditorState
from kedit.editors.hparams import MemoirHparams
from kedit.hooks import Trace

METHOD = "memoir"
W, MASKS, BG, PERM = "mm.W", "mm.masks", "mm.bg_mean", "mm.perm"
BLOCK_U, BLOCK_V = "mm.block_u", "mm.block_v"  # entry e's block is U_e @ V_e
EXACT = "mm.exact"  # entry e's exact key: the fingerprint of its own prompt, without a prefix
# entry e's span key: the fingerprint of the token before its subject's last token (context-averaged),
# and whether it has one (its subject spans several tokens)
SPAN, SPAN_ON = "mm.span", "mm.span_on"
VSTAR = "mm.vstar"  # entry e's v*: where a later edit to the same object starts its own (``mm_warm_start``)


def block_rank(hp: MemoirHparams) -> int:
    """Rank of the stored blocks: the closed form's block lies in the span of the prompt contexts'
    inputs (one per context), Adam's is a full ``[d_out, k]`` block."""
    return hp.n_prefixes + 1 if hp.mm_solver == "vstar" else hp.mm_k


def memory_layer(hp: MemoirHparams, num_layers: int) -> int:
    """``mm_layer`` as a block index; -1 means the last of ``layers`` (where the weight editors write
    the subject: the memory also reads and writes at the subject's last token)."""
    layer = hp.resolve_layers(num_layers)[-1] if hp.mm_layer == -1 else hp.mm_layer
    if not 0 <= layer < num_layers - 1:
        raise ValueError(f"hparams ({hp.source or 'inline'}): mm_layer {hp.mm_layer} must name a block below "
                         f"the last of {num_layers}")
    return layer


def background_mean(lm, layer: int, texts: list[str], seq_len: int = 128) -> torch.Tensor:
    """Mean down-projection input at ``layer`` over every token of ``texts`` (float32 ``[d]``)."""
    name = lm.adapter.mlp_out_name(layer)
    total = torch.zeros(lm.adapter.key_dim(layer), dtype=torch.float64)
    count = 0
    with _attach.suspended(lm.model, METHOD):
        for t in texts:
            ids = lm.tokenizer(t, add_special_tokens=False, truncation=True, max_length=seq_len,
                               return_tensors="pt").input_ids.to(lm.device)
            if ids.shape[1] == 0:
                continue
            with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
                lm.model(input_ids=ids, use_cache=False)
            total += tr.inputs[name][0].double().sum(0).cpu()
            count += ids.shape[1]
    if count == 0:
        raise ValueError("memoir: the background texts produced no tokens")
    return (total / count).float()


def initial_state(lm, hp: MemoirHparams, texts: list[str] | None = None) -> EditorState:
    """An empty memory: layer, k, threshold, background mean (from ``texts``, default the first
    ``mm_bg_docs`` documents of the statistics corpus) and the seeded column permutation."""
    layer = memory_layer(hp, lm.adapter.num_layers)
    d = lm.adapter.key_dim(layer)
    if not 0 < hp.mm_k <= d:
        raise ValueError(f"hparams ({hp.source or 'inline'}): mm_k {hp.mm_k} must be in 1..{d} (layer width)")
    if texts is None:
        from kedit.stats.corpus import load_corpus

        texts = list(islice(load_corpus("wiki-summaries-en").texts(), hp.mm_bg_docs))
    gen = torch.Generator().manual_seed(hp.mm_perm_seed)
    tensors = {BG: background_mean(lm, layer, texts), PERM: torch.randperm(d, generator=gen),
               W: torch.zeros(lm.adapter.out_dim(layer), d), MASKS: torch.zeros(0, hp.mm_k, dtype=torch.long),
               BLOCK_U: torch.zeros(0, lm.adapter.out_dim(layer), block_rank(hp)),
               BLOCK_V: torch.zeros(0, block_rank(hp), hp.mm_k)}
    meta = {"layer": layer, "k": hp.mm_k, "rank": block_rank(hp), "read": hp.mm_read, "threshold": hp.mm_threshold,
            "entry_owner": [], "n_edits": 0, "n_batches": 0, "model_hash": lm.manifest.model_hash}
    if hp.mm_exact_key:
        tensors[EXACT] = torch.zeros(0, hp.mm_k, dtype=torch.long)
        meta["exact_threshold"] = hp.mm_exact_threshold
    return EditorState(METHOD, tensors=tensors, meta=meta)


def check_state(state: EditorState, lm, hp: MemoirHparams) -> None:
    if state.method != METHOD:
        raise ValueError(f"editor state is for {state.method!r}, not {METHOD!r}")
    want = {"layer": memory_layer(hp, lm.adapter.num_layers), "k": hp.mm_k, "rank": block_rank(hp),
            "read": hp.mm_read,
            "model_hash": lm.manifest.model_hash}
    bad = {k: (state.meta.get(k), v) for k, v in want.items() if state.meta.get(k) != v}
    if bad:
        raise ValueError(f"memoir state does not fit these hparams/model: {bad} (state, now)")
