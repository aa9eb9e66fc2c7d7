"""Batched v* optimisation: one forward/backward per Adam step for every request of a batch.

Each request r gets a vector δ_r added to the residual stream at its subject's last token at the
last edit layer, in every one of its prefixed prompts and its "{subject} is a" KL prompt. The loss
is the target's mean per-token NLL over the prefixed prompts, plus ``kl_factor`` · KL(now ‖ start)
on the KL prompt, plus ``v_weight_decay`` · (‖δ‖/‖v₀‖)². Losses are summed over requests, so each
δ_r gets exactly the gradient it would get alone. The blocks below the edit layer are run once;
each step replays only the blocks above and unembeds only the positions that predict target
tokens. A request whose NLL falls below ``v_stop_nll`` is frozen and its rows leave the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.editors.base import EditRequest, RequestDiagnostics
from kedit.editors.hparams import EditHparams
from kedit.editors.keys import average_by_request
from kedit.editors.prompts import pad_right, subject_rows, target_ids
from kedit.editors.runner import PrefixCache, base_model, capture_blocks, logits_at


@dataclass
class VStar:
    delta: torch.Tensor  # [n, d] float32: the optimised change of the layer output
    v0: torch.Tensor  # [n, d] float64: prefix-averaged layer output at the subject before the edit
    diagnostics: list[RequestDiagnostics]
    steps: int  # Adam steps of the longest-running request
    seconds: float = 0.0


def optimise_vstar(lm, requests: list[EditRequest], prefixes: list[str], hp: EditHparams, layer: int,
                   progress=None) -> VStar:
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
    subj_pos = torch.tensor(ctx.subj_pos + kl.subj_pos, device=dev)
    kl_rows = torch.arange(kl_row0, len(seqs), device=dev)
    kl_cols = torch.tensor([len(s) - 1 for s in kl.ids], device=dev)
    pair_row_t = torch.tensor(pair_row, device=dev)
    pair_col_t = torch.tensor(pair_col, device=dev)
    pair_lab_t = torch.tensor(pair_lab, device=dev)
    pair_w_t = torch.tensor(pair_w, device=dev, dtype=torch.float32)
    pair_req = rows_req[pair_row_t]

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_layers = lm.adapter.num_layers
    if layer >= n_layers - 1:
        raise ValueError(f"v*: edit layer {layer} must be below the last block ({n_layers - 1})")
    split = (ctx.subj_pos + kl.subj_pos) if hp.v_prefix_cache else [0] * len(seqs)
    sl = _slice_above(lm, seqs, split, layer, pad)
    shift = torch.tensor(split, device=dev)
    subj_pos = subj_pos - shift  # positions in the replayed (suffix) coordinates
    pair_col_t = pair_col_t - shift[pair_row_t]
    kl_cols = kl_cols - shift[kl_rows]
    n_rows = len(seqs)
    all_rows = torch.arange(n_rows, device=dev)

    ctx_rows = torch.arange(kl_row0, device=dev)
    v0 = average_by_request(sl.hidden[ctx_rows, subj_pos[:kl_row0]], rows_req[:kl_row0], n)  # [n, d]
    v0_norm = v0.norm(dim=1).to(torch.float32).clamp_min(1e-8)
    d = v0.shape[1]
    delta = torch.zeros(n, d, device=dev, dtype=torch.float32, requires_grad=True)
    m = torch.zeros(n, d, device=dev)
    v = torch.zeros(n, d, device=dev)
    t_step = torch.zeros(n, device=dev)
    b1, b2, eps = 0.9, 0.999, 1e-8
    max_norm = hp.clamp_norm_factor * v0_norm

    active = torch.ones(n, dtype=torch.bool, device=dev)
    kl_init: torch.Tensor | None = None
    loss_start = torch.zeros(n)
    loss_end = torch.zeros(n)
    nll_end = torch.zeros(n)
    steps_used = torch.zeros(n, dtype=torch.long)
    it = 0
    for it in range(max(1, hp.v_steps)):
        act_idx = active.nonzero().squeeze(1)
        rows = all_rows[active[rows_req]]
        local = torch.full((n_rows,), -1, dtype=torch.long, device=dev)
        local[rows] = torch.arange(rows.numel(), device=dev)
        h = sl.hidden.index_select(0, rows) if rows.numel() < n_rows else sl.hidden
        lr_idx = torch.arange(rows.numel(), device=dev)
        add = delta[rows_req[rows]].to(h.dtype)
        h = torch.index_put(h, (lr_idx, subj_pos[rows]), h[lr_idx, subj_pos[rows]] + add)
        out = sl.run(lm, h, rows=rows if rows.numel() < n_rows else None)

        pmask = active[pair_req]
        logits = logits_at(lm, out, local[pair_row_t[pmask]], pair_col_t[pmask])
        logp = torch.log_softmax(logits, dim=-1).gather(1, pair_lab_t[pmask][:, None]).squeeze(1)
        nll = torch.zeros(n, device=dev).index_add(0, pair_req[pmask], -logp * pair_w_t[pmask])

        kmask = active[rows_req[kl_rows]]
        kl_logp = torch.log_softmax(logits_at(lm, out, local[kl_rows[kmask]], kl_cols[kmask]), dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach()
        kl_term = torch.zeros(n, device=dev)
        kl_term[act_idx] = (kl_logp.exp() * (kl_logp - kl_init[act_idx])).sum(-1)
        wd = hp.v_weight_decay * (delta.norm(dim=1) / v0_norm) ** 2
        loss = nll + hp.kl_factor * kl_term + wd

        with torch.no_grad():
            if it == 0:
                loss_start = loss.detach().cpu().clone()
            done = active & ((nll.detach() < hp.v_stop_nll) | torch.tensor(it == hp.v_steps - 1, device=dev))
            for i in done.nonzero().squeeze(1).tolist():
                loss_end[i] = float(loss[i])
                nll_end[i] = float(nll[i])
                steps_used[i] = it
            active = active & ~done
        if progress is not None:
            progress(it, int(active.sum()), float(nll.detach()[act_idx].mean()))
        if not bool(active.any()):
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
    diags = [
        RequestDiagnostics(
            request_id=r.id, vstar_loss_start=float(loss_start[i]), vstar_loss_end=float(loss_end[i]),
            vstar_steps=int(steps_used[i]), target_prob=float(torch.exp(-nll_end[i])),
            delta_norm=float(final[i].norm()), constraint_met=bool(nll_end[i] < hp.v_stop_nll))
        for i, r in enumerate(requests)
    ]
    return VStar(delta=final, v0=v0, diagnostics=diags, steps=it, seconds=time.perf_counter() - t0)


def _slice_above(lm, seqs: list[list[int]], split: list[int], layer: int, pad: int):
    """Blocks ``layer+1..`` ready to replay. With ``split`` > 0, tokens before ``split[r]`` (those before
    the subject's last token, which δ cannot affect) go into a read-only :class:`PrefixCache` and only
    the suffix is replayed: most of a prefixed prompt is computed once, not at every step."""
    dev = lm.device
    n_layers = lm.adapter.num_layers
    p_max = max(split)
    if p_max == 0:
        return capture_blocks(lm, pad_right(seqs, pad, dev), layer + 1, n_layers)
    past_ids = pad_right([s[:p] if p else [pad] for s, p in zip(seqs, split)], pad, dev)
    p_max = past_ids.shape[1]
    cache = PrefixCache(config=lm.model.config)
    with torch.no_grad():  # right-padded, no mask: real tokens never see the pads
        base_model(lm)(input_ids=past_ids, past_key_values=cache, use_cache=True)
    cache.frozen = True
    suffix = [s[p:] for s, p in zip(seqs, split)]
    suf_ids = pad_right(suffix, pad, dev)
    width = suf_ids.shape[1]
    mask = torch.zeros(len(seqs), p_max + width, dtype=torch.long, device=dev)
    for i, (p, suf) in enumerate(zip(split, suffix)):
        mask[i, :p] = 1
        mask[i, p_max: p_max + len(suf)] = 1
    pos = torch.tensor(split, device=dev)[:, None] + torch.arange(width, device=dev)[None]
    return capture_blocks(lm, suf_ids, layer + 1, n_layers, attention_mask=mask, position_ids=pos,
                          past_key_values=cache, use_cache=True)
