"""Run a slice of the transformer's blocks on cached hidden states.

v* only changes the residual stream at the last edit layer, so the blocks below it give the same
output at every Adam step: we run them once, keep the hidden states, and each step replays only
the blocks above. The per-block call arguments (rotary embeddings, masks...) are captured from
one real forward (a :class:`kedit.hooks.Trace` that keeps each block's call arguments and stops
before the last one runs), so every family is replayed with exactly the arguments its own model passes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kedit.hooks import Trace


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
    taps: dict[str, torch.Tensor] = field(default_factory=dict)  # inputs of modules run below ``start``
    # with a prefix cache: the same modules' input at each row's last cached token, [rows, d] (zeros for
    # a row with nothing cached)
    taps_before: dict[str, torch.Tensor] = field(default_factory=dict)

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


def cache_kwargs(lm, cache) -> dict:
    """``{name: cache}`` under the name the model's forward takes. transformers 5.2x renamed
    ``past_key_values`` to ``cache`` (the old name warns on every call and goes in 5.40); older 5.x
    releases know only the old one."""
    return {_cache_name(type(base_model(lm))): cache}


@functools.lru_cache(maxsize=16)  # one entry per model class: bounded, for a worker that loads many models
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def uniform_blocks(model) -> bool:
    """True when every block gets the same call arguments (no per-layer attention types such as
    Gemma's alternating sliding windows), so one block's captured arguments serve them all."""
    types = getattr(model.config, "layer_types", None)
    return not types or len(set(types)) == 1


def capture_blocks(lm, input_ids: torch.Tensor, start: int, stop: int, taps: Sequence[str] = (),
                   **forward_kwargs) -> BlockSlice:
    """One no-grad forward up to block ``stop-1``'s input (or only ``start``'s, when all blocks take the
    same arguments); returns the states entering ``start`` and every block's call arguments. ``taps``:
    modules that run below block ``start`` whose (first) input the same pass keeps, in ``.taps``, so
    a caller that needs, e.g., an MLP's input on these rows does not run the model again."""
    layers = lm.adapter.module(lm.adapter.spec.layers)
    if not 0 <= start < stop <= len(layers):
        raise ValueError(f"block slice [{start}, {stop}) outside 0..{len(layers)}")
    full_stop = stop
    if uniform_blocks(lm.model):
        stop = start + 1
    names = [lm.adapter.layer_name(i) for i in range(start, stop)]
    with torch.no_grad(), Trace(lm.model, names, retain_input=True, retain_call=True, stop_before=True) as tr, \
            Trace(lm.model, taps, retain_input=True) as tapped:
        base_model(lm)(input_ids=input_ids, **({"use_cache": False} | forward_kwargs))
    if len(tr.calls) != stop - start or names[0] not in tr.inputs:
        raise RuntimeError(f"{type(lm.model).__name__}: blocks {start}..{stop - 1} were not all called")
    missing = [t for t in taps if t not in tapped.inputs]
    if missing:
        raise ValueError(f"taps {missing} did not run below block {start}")
    calls = [tr.calls[n] for n in names]
    calls = calls + [calls[-1]] * (full_stop - stop)
    return BlockSlice(hidden=tr.inputs[names[0]], calls=calls, start=start, stop=full_stop, taps=dict(tapped.inputs))


@contextmanager
def matmul_weights_in(modules: list[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Swap every 2-D floating parameter under ``modules`` for a ``dtype`` copy, and put the originals
    (the same Parameter objects: ties and later edits intact) back afterwards. Under autocast to that
    dtype the matmuls then read the copies; otherwise autocast would cast every float32 weight again at
    every call (its cast cache only keeps weights that require grad), which took 40% of a bfloat16
    v* step on SmolLM2. Norm gains and biases (1-D) stay as they are."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    seen: set[tuple[int, str]] = set()
    try:
        for mod in modules:
            for sub in mod.modules():
                for name, p in list(sub.named_parameters(recurse=False)):
                    if (id(sub), name) in seen or p.dim() != 2 or not p.is_floating_point() or p.dtype == dtype:
                        continue
                    seen.add((id(sub), name))
                    swapped.append((sub, name, p))
                    setattr(sub, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
        yield
    finally:
        for sub, name, p in reversed(swapped):
            setattr(sub, name, p)


def packed_gqa_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                    scaling: float | None = None) -> torch.Tensor:
    """Grouped-query attention without copying keys and values once per query head.

    ``query`` [b, heads, q, d]; ``key``/``value`` [b, kv_heads, k, d]; ``mask`` [b or 1, 1, q, k] (bool,
    True = attend, or additive float), the same for every head. Query heads ``i·g .. i·g+g-1`` read kv
    head ``i`` (transformers' ``repeat_kv`` order), so they are stacked along the query axis of their kv
    head, and the mask is tiled to match: one SDPA call on the kv heads as they are. Returns
    [b, q, heads, d], the layout transformers' attention functions return. Why: a replayed suffix of a
    few tokens attends to a cached prefix several times its length, and ``repeat_kv`` copied that
    prefix's keys and values three times per layer and step on SmolLM2 (9 query heads, 3 kv heads):
    fwd+bwd of one layer's attention for 600 rows took 205 ms, 40 ms packed."""
    b, h, q, d = query.shape
    kv = key.shape[1]
    g = h // kv
    if kv * g != h or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"packed GQA: {h} query heads over {kv} kv heads with a {tuple(mask.shape)} mask")
    mb = mask.shape[0]
    qp = query.reshape(b, kv, g * q, d)
    mp = mask[:, :, None].expand(mb, 1, g, q, mask.shape[-1]).reshape(mb, 1, g * q, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(qp, key, value, attn_mask=mp, scale=scaling)
    return out.reshape(b, h, q, value.shape[-1]).transpose(1, 2).contiguous()


def _packable(module, query, mask, dropout, kwargs) -> bool:
    """The call is one that :func:`packed_gqa_sdpa` computes exactly as transformers' SDPA would."""
    return (getattr(module, "num_key_value_groups", 1) > 1 and isinstance(mask, torch.Tensor)
            and mask.dim() == 4 and mask.shape[1] == 1 and query.shape[2] > 1 and not dropout
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False))


@contextmanager
def replay_attention(lm) -> Iterator[None]:
    """The attention kernel for replayed blocks, installed in transformers' attention registry for
    the duration only:

    - inside a bfloat16 autocast, q, k and v are cast up and the kernel runs in float32 with autocast
      off (on a CPU the bfloat16 SDPA backward took six times the float32 one and ate most of what
      bfloat16 matmuls saved; autocast is per thread, so other threads' calls run as they were);
    - with SDPA, grouped-query heads and an explicit mask (a suffix replayed against a prefix cache),
      :func:`packed_gqa_sdpa` replaces ``repeat_kv`` + SDPA: the same attention, without the copies.

    Other kernels (eager, flash, flex) and calls that do not fit run the registered kernel unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    name = getattr(lm.model.config, "_attn_implementation", None)
    if name is None or name == "eager" or name not in fns:
        yield
        return
    local = fns._local_mapping  # the registry's per-instance overrides (transformers' GeneralInterface)
    had, prev, inner = name in local, local.get(name), fns[name]
    pack = name == "sdpa"

    def kernel(module, q, k, v, mask, *args, **kwargs):  # arguments passed on as they came
        if pack and not args and _packable(module, q, mask, kwargs.get("dropout", 0.0), kwargs):
            return packed_gqa_sdpa(q, k, v, mask, kwargs.get("scaling")), None
        return inner(module, q, k, v, mask, *args, **kwargs)

    def run(module, q, k, v, mask, *args, **kwargs):
        if not torch.is_autocast_enabled(q.device.type):
            return kernel(module, q, k, v, mask, *args, **kwargs)
        with torch.autocast(q.device.type, enabled=False):
            return kernel(module, q.float(), k.float(), v.float(), mask, *args, **kwargs)

    fns[name] = run
    try:
        yield
    finally:
        if had:
            local[name] = prev
        else:
            del fns[name]


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
    # per-layer keys/values that replace the stored ones (set between replays by SharedHeadSlice)
    override: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __init__(self, config=None, **kwargs) -> None:
        """``config`` is accepted and not used: every layer is a full one. A config with sliding-window
        layers (Gemma) would give those layers caches that drop all but the last window of keys; here
        a row's suffix must see its whole prefix, and the model's mask applies the window."""
        super().__init__(**kwargs)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.override is not None and layer_idx in self.override:
            k, v = self.override[layer_idx]
        else:
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


class KVTap(_cache_base()):
    """A cache that keeps nothing: each layer's update records its keys/values and returns them as
    they are, so rows attend to their own tokens only and the caller can read what a block wrote."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key_states, value_states)
        return key_states, value_states


@dataclass
class SharedHeadSlice:
    """Blocks ``start..stop-1`` for rows whose leading tokens are shared within groups (e.g. the same
    random prefix in front of many prompts). Each block runs once on the distinct heads, then on
    each row's remaining tokens, which attend to their group's head through a frozen cache: the shared
    tokens cost one row per group, not one per row. Same interface as :meth:`BlockSlice.run`, with
    hidden states as ``(heads, rest)`` pairs; the output is the rest's."""

    heads: BlockSlice
    rest: BlockSlice
    tap: KVTap
    cache: PrefixCache
    pick: torch.Tensor  # the head (group) of each row

    @property
    def start(self) -> int:
        return self.rest.start

    def run(self, lm, hidden: tuple[torch.Tensor, torch.Tensor] | None = None, begin: int | None = None,
            entries: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        first = self.start if begin is None else begin
        hh, hr = (self.heads.hidden, self.rest.hidden) if hidden is None else hidden
        for i in range(first, self.rest.stop):
            if entries is not None:
                entries[i] = (hh, hr)
            hh = self.heads.run(lm, hh, begin=i, upto=i + 1)
            k, v = self.tap.kv[i]
            self.cache.override[i] = (k.index_select(0, self.pick), v.index_select(0, self.pick))
            hr = self.rest.run(lm, hr, begin=i, upto=i + 1)
        return hr


@dataclass
class HeadLayout:
    """Rows split into a head shared by a group of rows (run once per group) and the rest of each row
    (run per row, attending to its group's head through a cache of ``m_max`` slots)."""

    heads: torch.Tensor  # [groups, m_max] distinct heads, right-padded
    pick: torch.Tensor  # the group of each row (0 for rows without a head: its slots are masked)
    rest: torch.Tensor  # [rows, r_max] each row's remaining tokens, right-padded
    mask: torch.Tensor  # [rows, m_max + r_max] what the rest attends to: its own head, then itself
    pos: torch.Tensor  # [rows, r_max] positions of the remaining tokens


def head_layout(seqs: list[list[int]], head: list[int], pad: int, device) -> HeadLayout | None:
    """The :class:`HeadLayout` of rows ``seqs`` whose first ``head[r]`` tokens are shared with the other
    rows of the same head (0: nothing shared); ``None`` when no row has a head."""
    from kedit.editors.prompts import pad_right

    uniq: dict[tuple[int, ...], int] = {}
    group = [uniq.setdefault(tuple(s[:m]), len(uniq)) if m else -1 for s, m in zip(seqs, head)]
    if not uniq:
        return None
    heads = pad_right([list(k) for k in uniq], pad, device)
    m_max = heads.shape[1]
    rest = [s[m:] for s, m in zip(seqs, head)]
    r_max = max(1, max(len(x) for x in rest))
    rest_ids = pad_right([x if x else [pad] for x in rest], pad, device)
    rest_ids = torch.nn.functional.pad(rest_ids, (0, r_max - rest_ids.shape[1]), value=pad)
    # pads of the rest come after its real tokens (no real query sees them) and keep a row with no
    # real token from attending to nothing
    mask = torch.ones(len(seqs), m_max + r_max, dtype=torch.long, device=device)
    for i, m in enumerate(head):
        mask[i, m:m_max] = 0
    pos = torch.tensor(head, device=device)[:, None] + torch.arange(r_max, device=device)[None]
    return HeadLayout(heads=heads, pick=torch.tensor([max(g, 0) for g in group], device=device), rest=rest_ids,
                      mask=mask, pos=pos)


def capture_shared(lm, seqs: list[list[int]], head: list[int], start: int, stop: int, pad: int
                   ) -> SharedHeadSlice:
    """A :class:`SharedHeadSlice` for rows ``seqs`` whose first ``head[r]`` tokens are shared with the
    other rows of the same head (``head[r]`` = 0: nothing shared). Needs ``start`` >= 1."""
    if start < 1:
        raise ValueError("shared heads need at least one block below the slice")
    lay = head_layout(seqs, head, pad, lm.device)
    if lay is None:
        raise ValueError("no shared heads")
    tap = KVTap(config=lm.model.config)
    head_slice = capture_blocks(lm, lay.heads, start, stop, **cache_kwargs(lm, tap), use_cache=True)
    cache = PrefixCache(config=lm.model.config)
    # every row starts from its group's head: in the blocks below the slice, and in those inside it that the
    # capture runs too (blocks with per-layer attention types, e.g. Gemma's sliding windows: the mask the
    # model builds counts the head's slots in every layer)
    for li in sorted(i for i in tap.kv if i < stop):
        k, v = tap.kv[li]
        cache.update(k.index_select(0, lay.pick), v.index_select(0, lay.pick), li)
    rest_slice = capture_blocks(lm, lay.rest, start, stop, attention_mask=lay.mask, position_ids=lay.pos,
                                **cache_kwargs(lm, cache), use_cache=True)
    cache.frozen = True
    cache.override = {}
    return SharedHeadSlice(heads=head_slice, rest=rest_slice, tap=tap, cache=cache, pick=lay.pick)
