"""Run a slice of the transformer's blocks on cached hidden states.

v* only changes the residual stream at the last edit layer, so the blocks below it give the same
output at every Adam step: we run them once, keep the hidden states, and each step replays only
the blocks above. The per-block call arguments (rotary embeddings, masks...) are captured from
one real forward, so every family is replayed with exactly the arguments its own model passes.

(:class:`kedit.hooks.Trace` sees a block's first input only; capturing keyword arguments needs a
``with_kwargs`` pre-hook, kept here and removed in ``finally``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class _Captured(Exception):
    pass


def _index_rows(x: Any, rows: torch.Tensor, n: int) -> Any:
    if isinstance(x, PrefixCache):
        return x.select_rows(rows)
    if isinstance(x, torch.Tensor):
        # batch-shaped tensors only (masks, rotary tables, position ids); 1-D ones (cache_position) are per token
        return x.index_select(0, rows) if x.dim() >= 2 and x.shape[0] == n and n > 1 else x
    if isinstance(x, tuple):
        return tuple(_index_rows(v, rows, n) for v in x)
    if isinstance(x, list):
        return [_index_rows(v, rows, n) for v in x]
    if isinstance(x, dict):
        return {k: _index_rows(v, rows, n) for k, v in x.items()}
    return x


@dataclass
class BlockSlice:
    """Hidden states entering block ``start`` and the call arguments of blocks ``start..stop-1``."""

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict]]
    start: int
    stop: int

    def run(self, lm, hidden: torch.Tensor | None = None, rows: torch.Tensor | None = None,
            upto: int | None = None, begin: int | None = None,
            entries: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Run blocks ``begin..upto-1`` (default: all captured) on ``hidden`` (default: the cached
        states entering ``start``; with ``begin`` > ``start``, pass the states entering ``begin``),
        optionally on a subset of batch rows. ``entries`` collects the states entering each block."""
        h = self.hidden if hidden is None else hidden
        n = self.hidden.shape[0]
        first = self.start if begin is None else begin
        if not self.start <= first <= self.stop:
            raise ValueError(f"block {first} outside the captured slice [{self.start}, {self.stop})")
        layers = lm.adapter.module(lm.adapter.spec.layers)
        for i in range(first, self.stop if upto is None else upto):
            if entries is not None:
                entries[i] = h
            args, kwargs = self.calls[i - self.start]
            if rows is not None:
                args, kwargs = _index_rows(args, rows, n), _index_rows(kwargs, rows, n)
            out = layers[i](h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple | list) else out
        return h


def base_model(lm) -> torch.nn.Module:
    """The transformer without its LM head: capture passes and prefix caches need no logits."""
    base = getattr(lm.model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) and base is not lm.model else lm.model


def uniform_blocks(model) -> bool:
    """True when every block gets the same call arguments (no per-layer attention types such as
    Gemma's alternating sliding windows), so one block's captured arguments serve them all."""
    types = getattr(model.config, "layer_types", None)
    return not types or len(set(types)) == 1


def capture_blocks(lm, input_ids: torch.Tensor, start: int, stop: int, **forward_kwargs) -> BlockSlice:
    """One no-grad forward up to block ``stop-1``'s input (or only ``start``'s, when all blocks take the
    same arguments); returns the states entering ``start`` and every block's call arguments."""
    layers = lm.adapter.module(lm.adapter.spec.layers)
    if not 0 <= start < stop <= len(layers):
        raise ValueError(f"block slice [{start}, {stop}) outside 0..{len(layers)}")
    full_stop = stop
    if uniform_blocks(lm.model):
        stop = start + 1
    calls: list[tuple[tuple, dict]] = []
    hidden: dict[str, torch.Tensor] = {}
    handles = []

    def make(i: int):
        def pre(_mod, args, kwargs):
            if i == start:
                hidden["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
            rest = args[1:] if args else ()
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls.append((rest, kw))
            if i == stop - 1:
                raise _Captured
        return pre

    try:
        for i in range(start, stop):
            handles.append(layers[i].register_forward_pre_hook(make(i), with_kwargs=True))
        with torch.no_grad():
            try:
                base_model(lm)(input_ids=input_ids, **({"use_cache": False} | forward_kwargs))
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(calls) != stop - start or "h" not in hidden:
        raise RuntimeError(f"{type(lm.model).__name__}: blocks {start}..{stop - 1} were not all called")
    calls = calls + [calls[-1]] * (full_stop - stop)
    return BlockSlice(hidden=hidden["h"], calls=calls, start=start, stop=full_stop)


def unembed_states(lm, x: torch.Tensor) -> torch.Tensor:
    """Final norm and unembedding of final hidden states ``x`` [m, d] -> float32 logits [m, vocab]."""
    return lm.adapter.unembed(lm.adapter.final_norm(x)).float()


def _cache_base():
    from transformers import DynamicCache

    return DynamicCache


class PrefixCache(_cache_base()):
    """Keys/values of the tokens before each row's subject, computed once and then read-only.

    v* only changes the residual stream from the subject's last token on, so earlier tokens have
    the same keys and values at every Adam step; each step runs only the suffix against this cache.
    Once :attr:`frozen`, ``update`` returns ``cat(prefix, new)`` without storing anything, so the
    same cache serves every step (and a row subset via :meth:`select_rows`).
    """

    frozen = False
    rows: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        k, v = layer.keys, layer.values
        if self.rows is not None:
            k, v = k.index_select(0, self.rows), v.index_select(0, self.rows)
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def select_rows(self, rows: torch.Tensor) -> PrefixCache:
        import copy

        view = copy.copy(self)
        view.rows = rows if self.rows is None else self.rows.index_select(0, rows)
        return view
