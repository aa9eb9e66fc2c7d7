"""Writing a batch: each request's entry (mask, exact key, span key) at its subject's last token and
its block, from the batch's v* in closed form (``mm_solver: vstar``) or by Adam on the block (``adam``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kedit.editors.base import EditorState, EditRequest, RequestDiagnostics
from kedit.editors.hparams import MemoirHparams
from kedit.editors.memoir.memory import closed_form_blocks, fingerprint, warm_start
from kedit.editors.memoir.read import reads_own_block
from kedit.editors.memoir.state import BG, PERM, VSTAR, W
from kedit.editors.prompts import pad_right, subject_rows, target_ids
from kedit.editors.target_logprob import target_logprobs
from kedit.hooks import Trace


def inputs_at(lm, name: str, seqs: list[list[int]], pos: list[int], chunk: int = 64) -> torch.Tensor:
    """Module ``name``'s input at position ``pos[i]`` of each sequence (float32 ``[rows, d]``), from
    right-padded forwards that stop at the module (causal rows never see their pads)."""
    dev = lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    xs = []
    for c in range(0, len(seqs), chunk):
        part = seqs[c: c + chunk]
        with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
            lm.model(input_ids=pad_right(part, pad, dev), use_cache=False)
        xs.append(tr.inputs[name][torch.arange(len(part), device=dev),
                                  torch.tensor(pos[c: c + chunk], device=dev)].float())
    return torch.cat(xs) if xs else torch.zeros(0, lm.adapter.key_dim(0), device=dev)


def span_keys(lm, requests: list[EditRequest], prefixes: list[str], state: EditorState, layer: int, k: int,
              before: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's span key and whether it has one: the fingerprint of the down-projection input at
    the token before the subject's last token, averaged over the prompt contexts, for subjects that
    span several tokens in every context (``[n, k]`` int64, ``[n]`` bool; unguarded rows hold
    ``0..k-1`` and are never read). ``before`` (``[n, contexts, d]``): those inputs as v*'s first pass
    read them; without it only those tokens run, up to the memory layer."""
    rows = subject_rows(lm.tokenizer, requests, prefixes)
    n, n_ctx = len(requests), len(prefixes)
    multi = torch.tensor([f < p for f, p in zip(rows.subj_first, rows.subj_pos)]).view(n, n_ctx)
    guarded = multi.all(1)
    keys = torch.arange(k, dtype=torch.long).expand(n, k).clone()
    pick = [r for r in range(len(rows.ids)) if bool(guarded[rows.req[r]])]
    if pick and before is not None:
        keys[guarded] = fingerprint(before[guarded.to(before.device)].mean(1), state.tensors[BG],
                                    state.tensors[PERM], k).cpu()
    elif pick:
        x = inputs_at(lm, lm.adapter.mlp_out_name(layer), [rows.ids[r][: rows.subj_pos[r]] for r in pick],
                      [rows.subj_pos[r] - 1 for r in pick]).view(-1, n_ctx, lm.adapter.key_dim(layer))
        keys[guarded] = fingerprint(x.mean(1), state.tensors[BG], state.tensors[PERM], k).cpu()
    return keys, guarded


@dataclass
class Written:
    """What :func:`write_batch` found for a batch: blocks ``(U, V)``, masks, exact keys, diagnostics, the
    memory layer's input at the token before each context's subject (``[n, contexts, d]`` when v*'s
    first pass read it), the batch's v* and how many requests started from a stored one."""

    uv: tuple[torch.Tensor, torch.Tensor]
    masks: torch.Tensor
    exact: torch.Tensor
    diags: list[RequestDiagnostics]
    before: torch.Tensor | None = None
    vstar: torch.Tensor | None = None
    warm: int = 0


def write_batch(lm, requests, prefixes, state: EditorState, layer: int, k: int, hp: MemoirHparams, progress
           ) -> Written:
    """Fingerprints at each request's subject, then each request's block: v*'s closed form (v* started
    from the stored entries' with ``mm_warm_start``), or Adam on the block, one forward/backward per
    step for the whole batch (blocks below ``layer`` and the tokens before the subject run once)."""
    from kedit.editors.vstar import length_groups, slice_above

    dev, tok = lm.device, lm.tokenizer
    n, n_ctx = len(requests), len(prefixes)
    rows = subject_rows(tok, requests, prefixes)  # request-major: row = request * n_ctx + context
    tgts = target_ids(tok, [r.target_new for r in requests])
    seqs = [ids + tgts[q][:-1] for ids, q in zip(rows.ids, rows.req)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bg, perm = state.tensors[BG].to(dev), state.tensors[PERM].to(dev)
    w_prev = state.tensors[W].to(dev)

    # x, the down-projection input at `layer`, at every row's subject
    name = lm.adapter.mlp_out_name(layer)
    vs = None
    if hp.mm_solver == "vstar":  # v*'s own first pass reads x (on the model without the memory, as here)
        from kedit.editors.vstar import optimise_vstar

        init, warm = None, 0
        if hp.mm_warm_start and VSTAR in state.tensors:
            init, warm = warm_start(state.meta.get("entry_target", []), state.tensors[VSTAR],
                                 [r.target_new for r in requests])
        vs = optimise_vstar(lm, requests, prefixes, hp, layer, progress=progress, taps=[name], init=init)
        x, before = vs.taps[name], vs.taps_before[name]
    else:
        x, before = inputs_at(lm, name, rows.ids, rows.subj_pos).view(n, n_ctx, -1), None  # [n, ctx, d]
    masks = fingerprint(x.mean(1), bg, perm, k)  # [n, k]: one entry per request, context-averaged
    exact = fingerprint(x[:, 0], bg, perm, k)  # [n, k]: the bare prompt's own (context 0 has no prefix)
    xsel = x.gather(2, masks[:, None, :].expand(n, n_ctx, k))  # [n, ctx, k]
    # what a token reading this entry already gets on its columns: nothing when each entry is read alone,
    # the other entries' sum there when W' is shared
    w_old = torch.zeros(n, w_prev.shape[0], k, device=dev) if reads_own_block(state) \
        else w_prev[:, masks].permute(1, 0, 2)  # [n, d_out, k]
    if vs is not None:
        uv, diags = _blocks_from_vstar(vs, hp, xsel, w_old)
        return Written(uv, masks, exact, diags, before, vs.delta, warm)
    # Adam moves every entry by about lr per step whatever the activation scale: train the block in
    # units of the entry's context-mean input norm, so lr means the same on every model and layer
    scale = x.mean(1).gather(1, masks).norm(dim=1).clamp_min(1e-8)[:, None, None]
    scaled = torch.zeros_like(w_old, requires_grad=True)

    groups = []  # rows of one replayed length; pairs = (local row, column, label, request, weight)
    for g in length_groups(seqs, rows.subj_pos, hp.v_replay_merge_tokens):
        sl = slice_above(lm, [seqs[r] for r in g], [rows.subj_pos[r] for r in g], layer, pad)
        pr, pc, pl, pq, pw = [], [], [], [], []
        for j, r in enumerate(g):
            q = rows.req[r]
            start = len(rows.ids[r]) - 1 - rows.subj_pos[r]
            for t, lab in enumerate(tgts[q]):
                pr.append(j), pc.append(start + t), pl.append(lab), pq.append(q)
                pw.append(1.0 / (len(tgts[q]) * n_ctx))
        groups.append((torch.tensor(g, device=dev), torch.tensor([rows.req[r] for r in g], device=dev), sl,
                       *(torch.tensor(v, device=dev) for v in (pr, pc, pl, pq)),
                       torch.tensor(pw, device=dev, dtype=torch.float32)))

    opt = torch.optim.Adam([scaled], lr=hp.mm_lr)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    first, last = torch.zeros(n), torch.zeros(n)
    steps = torch.zeros(n, dtype=torch.long)
    for it in range(max(1, hp.mm_steps)):
        blocks = scaled / scale
        delta = torch.einsum("nok,nck->nco", w_old + blocks, xsel).reshape(n * n_ctx, -1)  # per row
        nll = torch.zeros(n, device=dev)
        for g, rq, sl, pr, pc, pl, pq, pw in groups:  # only the rows of requests still training
            on = active[rq]
            if not bool(on.any()):
                continue
            sel = on.nonzero().squeeze(1)
            h = sl.hidden.index_select(0, sel)
            h = torch.cat([h[:, :1] + delta[g[sel]].to(h.dtype)[:, None], h[:, 1:]], 1)  # suffix starts at the subject
            out = sl.run(lm, h, rows=None if bool(on.all()) else sel)
            local = torch.full_like(rq, -1)
            local[sel] = torch.arange(sel.numel(), device=dev)
            pm = on[pr]
            # log p(label) without [pairs, vocab] logits (Gemma 3: a 262,144-token vocabulary)
            logp, _ = target_logprobs(lm, out[local[pr[pm]], pc[pm]], pl[pm])
            nll = nll.index_add(0, pq[pm], -logp * pw[pm])
        with torch.no_grad():
            cur = nll.detach().cpu()
            if it == 0:
                first = cur.clone()
            act = active.cpu()
            done = act & ((cur < hp.mm_stop_nll) | (it == hp.mm_steps - 1))
            last = torch.where(act, cur, last)
            steps = torch.where(act, torch.full_like(steps, it), steps)
            active &= ~done.to(dev)
        if progress is not None:
            progress(it, int(active.sum()), float(cur[act].mean()))
        if not bool(active.any()):
            break
        opt.zero_grad(set_to_none=True)
        (nll * active.to(nll.dtype)).sum().backward()
        _masked_adam_step(opt, scaled, active)
    blocks = (scaled / scale).detach()
    eye = torch.eye(k, device=blocks.device).expand(n, k, k).contiguous()
    diags = [RequestDiagnostics(request_id=r.id, vstar_loss_start=float(first[i]), vstar_loss_end=float(last[i]),
                                vstar_steps=int(steps[i]), target_prob=float(torch.exp(-last[i])),
                                delta_norm=float(blocks[i].norm()),
                                constraint_met=bool(last[i] < hp.mm_stop_nll))
             for i, r in enumerate(requests)]
    return Written((blocks, eye), masks, exact, diags)


def _masked_adam_step(opt: torch.optim.Adam, blocks: torch.Tensor, active: torch.Tensor) -> None:
    """One Adam step for the active requests' blocks only: finished requests keep their block and
    their moments, exactly as if they had left the batch."""
    st = opt.state.get(blocks)
    saved = None if st is None else {k: v.clone() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0}
    before = blocks.detach().clone()
    opt.step()
    with torch.no_grad():
        keep = ~active
        blocks[keep] = before[keep]
        if saved is not None:
            for k, v in saved.items():
                opt.state[blocks][k][keep] = v[keep]


def _blocks_from_vstar(vs, hp: MemoirHparams, xsel: torch.Tensor, w_old: torch.Tensor):
    """The batch's v* at the memory layer (on the model without the memory: the subject token of a new
    fact reads its own entry, not an older one), written into each request's block in closed form."""
    u, v = closed_form_blocks(vs.delta.to(xsel.device), xsel, w_old, hp.mm_ridge)
    return (u, v), [replace(d, delta_norm=float((a @ b).norm())) for d, a, b in zip(vs.diagnostics, u, v)]
