"""Reading the memory on a live model: the forward hook on the memory layer's down-projection and the
share of an entry's output change a read adds (fixed, or scheduled by the number of entries); plus
:func:`text_inputs`, which held-out tokens would read it."""

from __future__ import annotations

import torch

from kedit.editors import attach as _attach
from kedit.editors.base import EditorState
from kedit.editors.memoir.memory import (
    SpanGuard,
    memory_delta,
    one_hot_sets,
    own_block_delta,
    previous_tokens,
    read_memory,
)
from kedit.editors.memoir.state import BG, BLOCK_U, BLOCK_V, EXACT, MASKS, METHOD, PERM, SPAN, SPAN_ON, W
from kedit.hooks import Trace


def scheduled_share(schedule: list, entries: int) -> float:
    """The share ``schedule`` (``[[entries, share], ...]``, entries increasing) gives a memory of
    ``entries``: linear between its points, its first / last share before / past its ends."""
    pts = [(int(n), float(s)) for n, s in schedule]
    if entries <= pts[0][0]:
        return pts[0][1]
    for (n0, s0), (n1, s1) in zip(pts, pts[1:]):
        if entries <= n1:
            return s0 + (s1 - s0) * (entries - n0) / (n1 - n0)
    return pts[-1][1]


def read_scale(state: EditorState) -> float:
    """``mm_read_scale`` (or ``mm_read_scale_by_entries`` at this state's number of entries): the share of
    an entry's output change a token reading it through its mask gets (1.0 for states from before the
    setting)."""
    if "read_scale_by_entries" in state.meta:
        n = int(state.tensors[MASKS].shape[0]) if MASKS in state.tensors else 0
        return scheduled_share(state.meta["read_scale_by_entries"], n)
    return float(state.meta.get("read_scale", 1.0))


def exact_read_scale(state: EditorState) -> float:
    """``mm_exact_read_scale``: the share a token reading an entry through its exact key gets (states
    from before the setting: the mask reads' share)."""
    return float(state.meta.get("exact_read_scale", read_scale(state)))


def reads_own_block(state: EditorState) -> bool:
    """``mm_read: own``: a matching token reads its entry's block alone (states from before the
    setting existed read the shared W')."""
    return state.meta.get("read", "shared") == "own"


def attach(lm, state: EditorState) -> _attach.Attachment:
    """Put the state's memory on ``lm`` (a forward hook on layer ``L``'s down-projection), replacing
    any memory attached before. Tokens that fire no entry leave the module's output untouched.

    An entry's block holds a change v* computed for the residual stream, so it is added where the
    MLP's output joins that stream: at the down-projection's output, or, in a family with a norm after
    the MLP (Gemma 2/3, OLMo 2), after that norm (the down-projection's hook computes the change from
    its input; a hook on the norm adds it)."""
    if state.method != METHOD:
        raise ValueError(f"editor state is for {state.method!r}, not {METHOD!r}")
    layer, k, thr = int(state.meta["layer"]), int(state.meta["k"]), float(state.meta["threshold"])
    thr_x = float(state.meta.get("exact_threshold", 1.0))
    scale, scale_x = read_scale(state), exact_read_scale(state)
    d = lm.adapter.key_dim(layer)
    dev = lm.device
    masks = state.tensors[MASKS].to(dev) if MASKS in state.tensors else torch.zeros(0, k, dtype=torch.long)
    own = reads_own_block(state)
    if own:
        u, v = state.tensors[BLOCK_U].to(dev), state.tensors[BLOCK_V].to(dev)
    else:
        w = state.tensors[W].to(dev) if W in state.tensors else torch.zeros(lm.adapter.out_dim(layer), d)
    bg, perm = state.tensors[BG].to(dev), state.tensors[PERM].to(dev)
    stored = one_hot_sets(masks.to(dev), d)
    exact = one_hot_sets(state.tensors[EXACT].to(dev), d) if EXACT in state.tensors else None
    guarded = state.tensors[SPAN_ON].to(dev) if SPAN_ON in state.tensors else None
    spans = one_hot_sets(state.tensors[SPAN].to(dev), d) if guarded is not None and bool(guarded.any()) else None
    thr_s = float(state.meta.get("span_threshold", 0.0))
    # the token before position 0 of a call: the last token of the previous call, when this call continues
    # it through a KV cache (seen by a pre-hook on the whole model); otherwise there is none
    calls = {"live": False, "continuing": False, "carry": None}

    def model_pre(_module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.2x: `cache`
        calls.update(live=True, continuing=_cache_length(cache) > 0)

    def model_post(_module, args, kwargs, output):
        calls.update(live=False, continuing=False)

    def change(x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        span = None
        if spans is not None:
            seq = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])  # a bare [tokens, d] input is one text
            carry = calls["carry"]
            carry = carry if calls["continuing"] and carry is not None and carry.shape[0] == seq.shape[0] else None
            calls["carry"] = seq[:, -1].detach().clone() if calls["live"] else None
            span = SpanGuard(*previous_tokens(seq, carry), spans, guarded, thr_s)
        with torch.no_grad():
            rd = read_memory(flat, bg, perm, stored, k, thr, exact, thr_x, span)
        if rd.tokens.numel() == 0:
            return None
        cols = masks[rd.entry]
        delta = own_block_delta(flat[rd.tokens], cols, u[rd.entry], v[rd.entry]) if own else \
            memory_delta(flat[rd.tokens], cols, w)
        if scale != 1.0 or scale_x != 1.0:
            delta = delta * torch.where(rd.exact, scale_x, scale).to(delta.dtype)[:, None]
        return rd.tokens, delta

    extra = (("", "pre", model_pre), ("", "post", model_post)) if spans is not None else ()
    return install_residual_change(lm, METHOD, layer, change, extra)


def install_residual_change(lm, tag: str, layer: int, change, extra: tuple = ()) -> _attach.Attachment:
    """Hook ``layer``'s down-projection under ``tag``: ``change(input)`` (the down-projection's input,
    ``[..., d]``) returns None or ``(tokens, delta)`` (flattened token rows and the change each gets), and
    the change is added where the MLP's output joins the residual stream: at the down-projection's output,
    or, in a family with a norm after the MLP, at that norm's output (the down-projection's hook holds it
    until the norm runs). The memory's read and calibration's forced reads both add their changes here."""
    name, add_name = lm.adapter.mlp_out_name(layer), lm.adapter.residual_out_name(layer)
    pending: dict = {}  # a post-norm family: (tokens, change) from the down-projection, for the norm's hook

    def hook(_module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        pending.clear()
        got = change(x)
        if got is None:
            return output
        tokens, delta = got
        if add_name != name:
            pending.update(tokens=tokens, delta=delta)
            return output
        return add_at(output, tokens, delta)

    def add_after_norm(_module, args, kwargs, output):
        if not pending:
            return output
        out = add_at(output, pending["tokens"], pending["delta"])
        pending.clear()
        return out

    if add_name != name:
        extra = (*extra, (add_name, "post", add_after_norm))
    return _attach.install(lm.model, tag, name, hook, extra)


def add_at(output: torch.Tensor, tokens: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``output`` (``[..., d]``, tokens flattened in order) with ``delta`` added at rows ``tokens``."""
    out = output.reshape(-1, output.shape[-1]).clone()
    out[tokens] = out[tokens] + delta.to(out.dtype)
    return out.view_as(output)


def _cache_length(cache) -> int:
    """Tokens already in a KV cache passed to the model (0: none, a fresh text)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple of (key, value) per layer
        return int(cache[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0


def text_inputs(lm, name: str, text: str, max_tokens: int, window: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``max_tokens`` tokens of ``text`` (int64 ``[T]``) and module ``name``'s input at each
    (float32 ``[T, d]``), read in consecutive windows of ``window`` tokens, each a fresh text, as
    perplexity reads it: which held-out tokens would read the memory, and through which entries."""
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0, :max_tokens]
    if ids.numel() == 0:
        raise ValueError("text_inputs: the text has no tokens")
    xs = []
    with _attach.suspended(lm.model, METHOD):
        for i in range(0, ids.shape[0], window):
            with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
                lm.model(input_ids=ids[None, i: i + window].to(lm.device), use_cache=False)
            xs.append(tr.inputs[name][0].float().cpu())
    return ids, torch.cat(xs)
