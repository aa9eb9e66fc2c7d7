"""Batched v* optimisation: one forward/backward per Adam step for every request of a batch.

Each request r gets a vector δ_r added to the residual stream at its subject's last token at the
last edit layer, in every one of its prefixed prompts and its "{subject} is a" KL prompt. The loss
is the target's mean per-token NLL over the prefixed prompts, plus ``kl_factor`` · KL(now ‖ start)
on the KL prompt, plus ``v_weight_decay`` · (‖δ‖/‖v₀‖)². Losses are summed over requests, so each
δ_r gets exactly the gradient it would get alone. The blocks below the edit layer are run once;
each step replays only the blocks above and unembeds only the positions that predict target
tokens (:mod:`kedit.editors.target_logprob`: the target's log-probability in one pass over vocabulary
chunks, no [pairs, vocab] tensor). A request whose NLL falls below ``v_stop_nll`` (or, with ``v_stop: most_probable``, whose
target tokens are all the top prediction in every context) is frozen and its rows leave the batch.
δ starts at 0, or where the caller says (``init``: memoir's warm start from earlier edits to the same
object); the KL term always compares with the unedited model.
With ``v_dtype: bfloat16`` the replayed matrices run as bfloat16 copies under autocast (attention,
δ and everything else float32): 1.5x faster on a CPU with bfloat16 units, the same edits on SmolLM2;
``v_dtype: auto`` does so only where the device has such units (a CPU without them runs bfloat16
products 200x slower than float32, see precision.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from kedit.editors.base import EditRequest, RequestDiagnostics
from kedit.editors.hparams import EditHparams
from kedit.editors.keys import average_by_request
from kedit.editors.precision import resolve_v_dtype
from kedit.editors.prompts import pad_right, shared_heads, subject_rows, target_ids
from kedit.editors.runner import (
    BlockSlice,
    PrefixCache,
    base_model,
    cache_kwargs,
    capture_blocks,
    matmul_weights_in,
    replay_attention,
    unembed_states,
)
from kedit.editors.target_logprob import target_logprobs
from kedit.hooks import Trace


@dataclass
class VStar:
    delta: torch.Tensor  # [n, d] float32: the optimised change of the layer output
    v0: torch.Tensor  # [n, d] float64: prefix-averaged layer output at the subject before the edit
    diagnostics: list[RequestDiagnostics]
    steps: int  # Adam steps of the longest-running request
    seconds: float = 0.0
    layer: int = -1  # the layer whose output δ changes
    dtype: str = "float32"  # the replayed matmuls' precision as run (``v_dtype`` resolved on the device)
    request_ids: tuple = ()
    # inputs of the modules asked for with ``taps`` at each prompt context's subject, before any δ:
    # [n, contexts, d_in] float32 (request-major, the rows of ``subject_rows(tok, requests, prefixes)``)
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    # the same modules' input at the token before each context's subject token (zeros where the subject
    # token opens the text): [n, contexts, d_in] float32
    taps_before: dict[str, torch.Tensor] = field(default_factory=dict)


# the hyperparameters v* reads: settings that differ only elsewhere (the solve) can share one v*
VSTAR_FIELDS = ("v_lr", "v_steps", "v_weight_decay", "kl_factor", "clamp_norm_factor", "v_stop_nll",
                "v_stop", "v_prefix_cache", "v_dtype", "v_replay_merge_tokens", "n_prefixes", "prefix_len", "prefix_seed")


def vstar_signature(hp: EditHparams, layer: int) -> tuple:
    return (layer, *(getattr(hp, f) for f in VSTAR_FIELDS))


def vstar_for(lm, requests: list[EditRequest], prefixes: list[str], hp: EditHparams, layer: int,
              given: VStar | None = None, progress=None) -> VStar:
    """``given`` when it was optimised for these requests at this layer, else a fresh optimisation."""
    if given is None:
        return optimise_vstar(lm, requests, prefixes, hp, layer, progress=progress)
    if given.layer != layer or given.request_ids != tuple(r.id for r in requests) \
            or given.delta.shape[0] != len(requests):
        raise ValueError(f"the given v* was optimised for other requests or layer {given.layer} (edit layer {layer})")
    return given


def optimise_vstar(lm, requests: list[EditRequest], prefixes: list[str], hp: EditHparams, layer: int,
                   progress=None, taps: Sequence[str] = (), init: torch.Tensor | None = None) -> VStar:
    """``taps``: modules at or below ``layer`` whose input at every context's subject token the first
    (no-grad) pass also returns, in ``VStar.taps``: what an editor would otherwise run the model for.
    ``init`` ([n, d]): where Adam starts δ (zeros when not given); the KL term and the weight decay
    still measure from the unedited model, so a start changes only how many steps δ needs."""
    import time

    t0 = time.perf_counter()
    tok, dev = lm.tokenizer, lm.device
    n = len(requests)
    ctx = subject_rows(tok, requests, prefixes)
    kl = subject_rows(tok, requests, [""], template="{} is a")
    tgts = target_ids(tok, [r.target_new for r in requests])
    n_ctx = len(prefixes)

    seqs: list[list[int]] = []
    pair_row, pair_col, pair_lab, pair_w = [], [], [], []
    for row, (ids, r) in enumerate(zip(ctx.ids, ctx.req)):
        t = tgts[r]
        seqs.append(ids + t[:-1])
        for j, lab in enumerate(t):
            pair_row.append(row)
            pair_col.append(len(ids) - 1 + j)
            pair_lab.append(lab)
            pair_w.append(1.0 / (len(t) * n_ctx))
    kl_row0 = len(seqs)
    seqs.extend(kl.ids)
    rows_req = torch.tensor(ctx.req + kl.req, device=dev)
    pair_lab_t = torch.tensor(pair_lab, device=dev)
    pair_w_t = torch.tensor(pair_w, device=dev, dtype=torch.float32)
    pair_req = rows_req[torch.tensor(pair_row, device=dev)]

    _check_window(lm, seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_layers = lm.adapter.num_layers
    if layer >= n_layers - 1:
        raise ValueError(f"v*: edit layer {layer} must be below the last block ({n_layers - 1})")
    split = (ctx.subj_pos + kl.subj_pos) if hp.v_prefix_cache else [0] * len(seqs)
    all_pos = ctx.subj_pos + kl.subj_pos
    store = _prefix_store(lm, seqs, split, pad, taps) if max(split) > 0 else None  # one for all groups
    groups = [_Group.build(lm, g, seqs, split, all_pos, ctx.req + kl.req, layer, pad, pair_row, pair_col, kl_row0,
                           taps, store) for g in length_groups(seqs, split, hp.v_replay_merge_tokens)]
    del store
    tapped, tapped_before = {}, {}
    for name in taps:  # each row's input at its subject (as h0 below), kept for the context rows
        x = torch.empty(len(seqs), groups[0].sl.taps[name].shape[-1], dtype=torch.float32, device=dev)
        xb = torch.zeros_like(x)  # and at the token before it: in the prefix cache, or in the replayed rows
        for g in groups:
            ar = torch.arange(g.rows.numel(), device=dev)
            x[g.rows] = g.sl.taps[name][ar, g.subj].float()
            if name in g.sl.taps_before:
                xb[g.rows] = g.sl.taps_before[name].float()
            else:
                xb[g.rows] = torch.where((g.subj > 0)[:, None], g.sl.taps[name][ar, (g.subj - 1).clamp_min(0)].float(), 0.0)
        tapped[name] = x[:kl_row0].view(n, n_ctx, -1)
        tapped_before[name] = xb[:kl_row0].view(n, n_ctx, -1)

    ctx_rows = torch.arange(kl_row0, device=dev)
    h0 = torch.zeros(len(seqs), groups[0].sl.hidden.shape[-1], dtype=torch.float64, device=dev)
    for g in groups:  # the layer output at each row's subject, before any δ
        h0[g.rows] = g.sl.hidden[torch.arange(g.rows.numel(), device=dev), g.subj].to(torch.float64)
    v0 = average_by_request(h0[ctx_rows], rows_req[:kl_row0], n)  # [n, d]
    v0_norm = v0.norm(dim=1).to(torch.float32).clamp_min(1e-8)
    d = v0.shape[1]
    delta = torch.zeros(n, d, device=dev, dtype=torch.float32)
    if init is not None:
        if tuple(init.shape) != (n, d):
            raise ValueError(f"v*: init has shape {tuple(init.shape)}, the batch needs ({n}, {d})")
        delta.copy_(init.to(dev, torch.float32))
    delta.requires_grad_(True)
    warm = init is not None and bool(init.ne(0).any())
    m = torch.zeros(n, d, device=dev)
    v = torch.zeros(n, d, device=dev)
    t_step = torch.zeros(n, device=dev)
    b1, b2, eps = 0.9, 0.999, 1e-8
    max_norm = hp.clamp_norm_factor * v0_norm

    v_dtype = resolve_v_dtype(hp.v_dtype, dev)
    bf16 = v_dtype == "bfloat16"
    autocast = torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16)
    replayed = [lm.adapter.module(lm.adapter.layer_name(i)) for i in range(layer + 1, n_layers)]
    active = torch.ones(n, dtype=torch.bool, device=dev)
    active_h = torch.ones(n, dtype=torch.bool)  # its host copy: the one read-back per Adam step
    kl_init: torch.Tensor | None = None
    # per-request results stay on the device and are filled by masks: no host sync per request
    loss_start = torch.zeros(n, device=dev)
    loss_end = torch.zeros(n, device=dev)
    nll_end = torch.zeros(n, device=dev)
    steps_used = torch.zeros(n, dtype=torch.long, device=dev)
    met_end = torch.zeros(n, dtype=torch.bool, device=dev)
    it = 0
    with ExitStack() as low_precision:
        low_precision.enter_context(replay_attention(lm))  # float32 under autocast; GQA without repeat_kv
        if bf16:  # the replayed blocks' and the unembedding's matrices as bfloat16 copies
            low_precision.enter_context(matmul_weights_in([*replayed, lm.adapter.unembed], torch.bfloat16))
        for it in range(max(1, hp.v_steps)):
            if it == 0 and warm:  # the KL reference is the unedited model's, not the warm start's
                with torch.no_grad(), autocast:
                    k0 = [g.step(lm, torch.zeros_like(delta), active_h, kl_only=True) for g in groups]
                    kl0 = torch.log_softmax(unembed_states(lm, torch.cat([k[2] for k in k0])), dim=-1)
                kl_init = torch.zeros(n, kl0.shape[1], device=dev)
                kl_init[torch.cat([k[3] for k in k0])] = kl0
            xs, pids, kxs, kreqs = [], [], [], []
            with autocast:
                for g in groups:  # rows of one suffix length each (or of nearby ones: v_replay_merge_tokens)
                    x, pid, kx, kreq = g.step(lm, delta, active_h)
                    xs.append(x), pids.append(pid), kxs.append(kx), kreqs.append(kreq)
                pid, kreq = torch.cat(pids), torch.cat(kreqs)
                # log p(target) and whether it is the top token, without [pairs, vocab] logits
                logp, is_top = target_logprobs(lm, torch.cat(xs), pair_lab_t[pid])
                kl_logits = unembed_states(lm, torch.cat(kxs))
            nll = torch.zeros(n, device=dev).index_add(0, pair_req[pid], -logp * pair_w_t[pid])

            kl_logp = torch.log_softmax(kl_logits, dim=-1)
            if kl_init is None:  # every request is active at the first step
                kl_init = torch.zeros(n, kl_logp.shape[1], device=dev)
                kl_init[kreq] = kl_logp.detach()
            kl_term = torch.zeros(n, device=dev)
            kl_term[kreq] = (kl_logp.exp() * (kl_logp - kl_init[kreq])).sum(-1)
            wd = hp.v_weight_decay * (delta.norm(dim=1) / v0_norm) ** 2
            loss = nll + hp.kl_factor * kl_term + wd

            with torch.no_grad():
                if it == 0:
                    loss_start = loss.detach().clone()
                met = nll.detach() < hp.v_stop_nll
                if hp.v_stop == "most_probable":  # no target token of the request is outranked anywhere
                    missed = torch.zeros(n, device=dev).index_add(0, pair_req[pid], (~is_top).to(torch.float32))
                    met = met | (missed == 0)
                done = active & (met | torch.tensor(it == hp.v_steps - 1, device=dev))
                loss_end = torch.where(done, loss.detach(), loss_end)
                nll_end = torch.where(done, nll.detach(), nll_end)
                steps_used = torch.where(done, torch.full_like(steps_used, it), steps_used)
                met_end = torch.where(done, met, met_end)
                was_active = active
                active = active & ~done
                # one read-back per step: the requests still active, and this step's mean NLL over its own
                read = torch.cat([active.to(torch.float32),
                                  (nll.detach() * was_active).sum()[None] / was_active.sum().clamp_min(1)]).cpu()
                active_h = read[:n] > 0
            if progress is not None:
                progress(it, int(active_h.sum()), float(read[n]))
            if not bool(active_h.any()):
                break
            (loss * active.to(loss.dtype)).sum().backward()
            with torch.no_grad():
                g = delta.grad
                a = active[:, None]
                m.copy_(torch.where(a, b1 * m + (1 - b1) * g, m))
                v.copy_(torch.where(a, b2 * v + (1 - b2) * g * g, v))
                t_step += active.to(t_step.dtype)
                tt = t_step.clamp_min(1)[:, None]
                step = hp.v_lr * (m / (1 - b1 ** tt)) / ((v / (1 - b2 ** tt)).sqrt() + eps)
                delta.sub_(torch.where(a, step, torch.zeros_like(step)))
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
                delta.grad = None

    final = delta.detach()
    ls, le, prob, norms_end, steps_l, met_l = (  # one device-to-host copy each, not one per request
        t.tolist() for t in (loss_start.cpu(), loss_end.cpu(), torch.exp(-nll_end).cpu(), final.norm(dim=1).cpu(),
                             steps_used.cpu(), met_end.cpu()))
    diags = [
        RequestDiagnostics(
            request_id=r.id, vstar_loss_start=ls[i], vstar_loss_end=le[i], vstar_steps=steps_l[i],
            target_prob=prob[i], delta_norm=norms_end[i], constraint_met=met_l[i])
        for i, r in enumerate(requests)
    ]
    return VStar(delta=final, v0=v0, diagnostics=diags, steps=it, seconds=time.perf_counter() - t0, layer=layer,
                 dtype=v_dtype, request_ids=tuple(r.id for r in requests),
                 taps=tapped, taps_before=tapped_before)


def _check_window(lm, seqs: list[list[int]]) -> None:
    """A clear error for rows longer than a sliding-window attention layer's window (Gemma 3: 512): the
    prefix cache holds a row's tokens in slots that can differ from its positions, and the window is
    applied to slots, so it would cut at the wrong tokens. Shorter rows never reach the window."""
    cfg = lm.model.config
    window = getattr(cfg, "sliding_window", None)
    if window and "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        longest = max(len(s) for s in seqs)
        if longest > window:
            raise ValueError(f"v*: a prefixed prompt has {longest} tokens, more than the model's sliding "
                             f"window ({window}); use shorter prompts or prefixes (prefix_len)")


def length_groups(seqs: list[list[int]], split: list[int], merge_tokens: int = 0) -> list[list[int]]:
    """Row indices grouped by replayed (suffix) length, shortest first. The next length joins the open
    group when padding the group's rows up to it adds at most ``merge_tokens`` tokens (0: one group per
    length, so each runs without padding)."""
    by_len: dict[int, list[int]] = {}
    for i, (s, p) in enumerate(zip(seqs, split)):
        by_len.setdefault(len(s) - p, []).append(i)
    groups: list[list[int]] = []
    width = 0  # the open group's length so far
    for k in sorted(by_len):
        if groups and len(groups[-1]) * (k - width) <= merge_tokens:
            groups[-1].extend(by_len[k])
        else:
            groups.append(list(by_len[k]))
        width = k
    return groups


@dataclass
class _Group:
    """Rows of one suffix length (or of nearby lengths, right-padded): their replayable slice and the
    positions v* reads from them. The index bookkeeping lives on the host (``*_h``): which rows are
    still active is decided there, so a step reads nothing back from the device."""

    rows: torch.Tensor  # global row ids
    req: torch.Tensor  # owning request of each local row
    subj: torch.Tensor  # subject position of each local row, in suffix coordinates
    sl: BlockSlice
    req_h: torch.Tensor  # owning request of each local row (host)
    pair_idx_h: torch.Tensor  # global ids of the target pairs in this group (host)
    pair_lrow_h: torch.Tensor
    pair_col_h: torch.Tensor
    kl_lrow_h: torch.Tensor  # local rows that are KL prompts, their read position and request (host)
    kl_col_h: torch.Tensor
    kl_req_h: torch.Tensor
    _picked: tuple | None = None  # (key, device indices) of the last selection: reused while it holds

    @classmethod
    def build(cls, lm, rows: list[int], seqs, split, subj_pos, req: list[int], layer, pad, pair_row, pair_col,
              kl_row0, taps: Sequence[str] = (), store: _PrefixStore | None = None) -> _Group:
        """``req``: the owning request of every row of the batch (host list)."""
        dev = lm.device
        local = {r: j for j, r in enumerate(rows)}
        pairs = [(pi, local[r], c - split[r]) for pi, (r, c) in enumerate(zip(pair_row, pair_col)) if r in local]
        kls = [(local[r], len(seqs[r]) - 1 - split[r], req[r]) for r in rows if r >= kl_row0]

        def col(items, k):
            return torch.tensor([t[k] for t in items], dtype=torch.long)

        take = None if store is None else store.take(torch.tensor(rows, device=dev))
        sl = slice_above(lm, [seqs[r] for r in rows], [split[r] for r in rows], layer, pad, taps, take)
        req_h = torch.tensor([req[r] for r in rows], dtype=torch.long)
        return cls(rows=torch.tensor(rows, device=dev), req=req_h.to(dev), sl=sl,
                   subj=torch.tensor([subj_pos[r] - split[r] for r in rows], device=dev), req_h=req_h,
                   pair_idx_h=col(pairs, 0), pair_lrow_h=col(pairs, 1), pair_col_h=col(pairs, 2),
                   kl_lrow_h=col(kls, 0), kl_col_h=col(kls, 1), kl_req_h=col(kls, 2))

    def pick(self, active_h: torch.Tensor, kl_only: bool, dev) -> dict[str, Any] | None:
        """Device indices of the rows to replay and of the positions to read, for the requests active
        in ``active_h`` (host bool [n]); None when no row of this group is active."""
        act = active_h[self.req_h]
        if kl_only:
            act = act & torch.zeros_like(act).index_fill_(0, self.kl_lrow_h, True)
        key = (kl_only, act.numpy().tobytes())
        if self._picked is not None and self._picked[0] == key:
            return self._picked[1]
        sel = act.nonzero().squeeze(1)
        if not sel.numel():
            self._picked = (key, None)
            return None
        local = torch.full((act.numel(),), -1, dtype=torch.long)
        local[sel] = torch.arange(sel.numel())
        pm, km = act[self.pair_lrow_h], act[self.kl_lrow_h]
        host = {"sel": sel, "pair_row": local[self.pair_lrow_h[pm]], "pair_col": self.pair_col_h[pm],
                "pair_idx": self.pair_idx_h[pm], "kl_row": local[self.kl_lrow_h[km]], "kl_col": self.kl_col_h[km],
                "kl_req": self.kl_req_h[km]}
        picked = {k: v.to(dev, non_blocking=True) for k, v in host.items()}
        picked["full"] = sel.numel() == act.numel()
        self._picked = (key, picked)
        return picked

    def step(self, lm, delta: torch.Tensor, active_h: torch.Tensor, kl_only: bool = False):
        """Replay the active rows with δ added at the subject; return the final hidden states at the
        target pairs (and their global ids) and at the KL read positions (and their requests).
        ``active_h``: the active requests, on the host. ``kl_only``: replay only the KL prompts' rows
        (no target pairs come back)."""
        p = self.pick(active_h, kl_only, delta.device)
        if p is None:
            empty = torch.zeros(0, delta.shape[1], device=delta.device, dtype=self.sl.hidden.dtype)
            none = torch.zeros(0, dtype=torch.long, device=delta.device)
            return empty, none, empty, none
        sel = p["sel"]
        h = self.sl.hidden if p["full"] else self.sl.hidden.index_select(0, sel)
        ar = torch.arange(sel.numel(), device=h.device)
        h = torch.index_put(h, (ar, self.subj[sel]), h[ar, self.subj[sel]] + delta[self.req[sel]].to(h.dtype))
        out = self.sl.run(lm, h, rows=None if p["full"] else sel)
        return out[p["pair_row"], p["pair_col"]], p["pair_idx"], out[p["kl_row"], p["kl_col"]], p["kl_req"]


@dataclass
class _PrefixStore:
    """K/V of each row's tokens before its split (per layer, [rows, kv heads, slots, head dim]), a
    [rows, slots] mask of the slots that hold them, and the tapped modules' input at each row's last
    cached token ([rows, d], zeros for a row with nothing cached)."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    valid: torch.Tensor
    before: dict[str, torch.Tensor]
    config: Any  # the model's config, for the caches taken

    def take(self, rows: torch.Tensor | None = None) -> tuple[PrefixCache, torch.Tensor, dict[str, torch.Tensor]]:
        """A :class:`PrefixCache` of ``rows`` (default all), cut to the slots any of them uses, with
        their mask and tapped inputs."""
        valid = self.valid if rows is None else self.valid.index_select(0, rows)
        used = valid.any(0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1

        def pick(x: torch.Tensor) -> torch.Tensor:
            return (x if rows is None else x.index_select(0, rows))[..., :width, :].contiguous()

        cache = PrefixCache(config=self.config)
        for li in sorted(self.keys):
            cache.update(pick(self.keys[li]), pick(self.values[li]), li)
        before = {k: x if rows is None else x.index_select(0, rows) for k, x in self.before.items()}
        return cache, valid[:, :width].contiguous(), before


def _prefix_store(lm, seqs: list[list[int]], split: list[int], pad: int, taps: Sequence[str] = ()) -> _PrefixStore:
    """The :class:`_PrefixStore` of rows ``seqs`` cached before ``split[r]``. Leading tokens shared by a
    group of rows (:func:`shared_heads`) run once per group; the rest of each row runs behind its
    group's head (masked for a row without one), in one pass per rest length: no pads. Why: a
    batch's rests run from 1 to ~15 tokens, and padding them to the longest made the pass run 2.9x
    the real tokens (CounterFact dev 2200-2299, SmolLM2); v* builds one store for all its rows, not
    one per replay group (12 passes instead of 49 there)."""
    dev, cfg = lm.device, lm.model.config
    n = len(seqs)
    cut = [s[:p] for s, p in zip(seqs, split)]
    head = shared_heads(seqs, split)
    uniq: dict[tuple[int, ...], int] = {}
    group = [uniq.setdefault(tuple(c[:m]), len(uniq)) if m else -1 for c, m in zip(cut, head)]
    pick = torch.tensor([max(g, 0) for g in group], device=dev)
    rest = [len(c) - m for c, m in zip(cut, head)]
    m_max = max((len(k) for k in uniq), default=0)
    width = m_max + max(rest)
    valid = torch.zeros(n, width, dtype=torch.long, device=dev)
    keys: dict[int, torch.Tensor] = {}  # layer -> [rows, kv heads, width, head dim], filled below
    values: dict[int, torch.Tensor] = {}
    before = {name: None for name in taps}

    def put(li: int, rows: torch.Tensor | slice, at: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        if li not in keys:
            keys[li] = k.new_zeros(n, k.shape[1], width, k.shape[3])
            values[li] = v.new_zeros(n, v.shape[1], width, v.shape[3])
        keys[li][rows, :, at] = k
        values[li][rows, :, at] = v

    def tap(name: str, rows: torch.Tensor, x: torch.Tensor) -> None:
        if before[name] is None:
            before[name] = x.new_zeros(n, x.shape[-1])
        before[name][rows] = x

    with torch.no_grad():
        head_cache = PrefixCache(config=cfg)
        if uniq:
            with Trace(lm.model, taps, retain_input=True) as th:
                base_model(lm)(input_ids=pad_right([list(k) for k in uniq], pad, dev),
                               **cache_kwargs(lm, head_cache), use_cache=True)
            for li, layer in enumerate(head_cache.layers):  # every row starts from its group's head
                put(li, slice(None), slice(0, m_max), layer.keys.index_select(0, pick),
                    layer.values.index_select(0, pick))
            for i, m in enumerate(head):
                valid[i, :m] = 1
            ends = [i for i, (r, m) in enumerate(zip(rest, head)) if r == 0 and m > 0]
            if ends:  # rows whose cached part is their head alone: its last token's inputs
                e = torch.tensor(ends, device=dev)
                last = torch.tensor([head[i] - 1 for i in ends], device=dev)
                for name in taps:
                    tap(name, e, th.inputs[name][pick[e], last])
        for length in sorted(set(rest) - {0}):
            rows = [i for i in range(n) if rest[i] == length]
            r = torch.tensor(rows, device=dev)
            ids = torch.tensor([cut[i][head[i]:] for i in rows], dtype=torch.long, device=dev)
            pos = torch.tensor([head[i] for i in rows], device=dev)[:, None] + torch.arange(length, device=dev)[None]
            cache, extra = PrefixCache(config=cfg), {}
            if uniq:  # the rows' heads (or masked slots for a row without one), then the rest itself
                for li, layer in enumerate(head_cache.layers):
                    cache.update(layer.keys.index_select(0, pick[r]), layer.values.index_select(0, pick[r]), li)
                extra["attention_mask"] = torch.cat([valid[r, :m_max], valid.new_ones(len(rows), length)], dim=1)
            with Trace(lm.model, taps, retain_input=True) as tr:
                base_model(lm)(input_ids=ids, position_ids=pos, **extra, **cache_kwargs(lm, cache), use_cache=True)
            for li, layer in enumerate(cache.layers):
                put(li, r, slice(m_max, m_max + length), layer.keys[:, :, -length:], layer.values[:, :, -length:])
            valid[r, m_max:m_max + length] = 1
            for name in taps:
                tap(name, r, tr.inputs[name][:, length - 1])
    return _PrefixStore(keys=keys, values=values, valid=valid,
                        before={name: x for name, x in before.items() if x is not None}, config=cfg)


def slice_above(lm, seqs: list[list[int]], split: list[int], layer: int, pad: int, taps: Sequence[str] = (),
                 prefix: tuple[PrefixCache, torch.Tensor, dict[str, torch.Tensor]] | None = None):
    """Blocks ``layer+1..`` ready to replay. With ``split`` > 0, tokens before ``split[r]`` (those before
    the subject's last token, which δ cannot affect) go into a read-only :class:`PrefixCache` and only
    the suffix is replayed: most of a prefixed prompt is computed once, not at every step. ``prefix``:
    these rows' cache, mask and tapped inputs from a :class:`_PrefixStore` built for more rows."""
    dev = lm.device
    n_layers = lm.adapter.num_layers
    if max(split) == 0:
        return capture_blocks(lm, pad_right(seqs, pad, dev), layer + 1, n_layers, taps)
    cache, valid, before = prefix if prefix is not None else _prefix_store(lm, seqs, split, pad, taps).take()
    cache.frozen = True
    suffix = [s[p:] for s, p in zip(seqs, split)]
    suf_ids = pad_right(suffix, pad, dev)
    width = suf_ids.shape[1]
    mask = torch.cat([valid, torch.zeros(len(seqs), width, dtype=torch.long, device=dev)], dim=1)
    for i, suf in enumerate(suffix):
        mask[i, valid.shape[1]: valid.shape[1] + len(suf)] = 1
    pos = torch.tensor(split, device=dev)[:, None] + torch.arange(width, device=dev)[None]
    sl = capture_blocks(lm, suf_ids, layer + 1, n_layers, taps, attention_mask=mask, position_ids=pos,
                        **cache_kwargs(lm, cache), use_cache=True)
    sl.taps_before = before
    return sl
