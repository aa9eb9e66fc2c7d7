"""The memory's math: fingerprints, overlaps, which entry a token reads, the residual W' and the
closed-form blocks. Pure tensor functions; no model, no state (docs/editors/memoir-findings.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fingerprint(x: torch.Tensor, bg: torch.Tensor, perm: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted column set ``perm[top_k(x - bg)]`` of each row of ``x`` ``[..., d]`` -> int64 ``[..., k]``."""
    idx = torch.topk(x.float() - bg.to(x.device, torch.float32), k, dim=-1).indices
    return torch.sort(perm.to(x.device)[idx], dim=-1).values


def one_hot_sets(sets: torch.Tensor, d: int) -> torch.Tensor:
    """``[n, k]`` index sets -> ``[n, d]`` float 0/1 rows (overlaps become one matmul)."""
    out = torch.zeros(sets.shape[0], d, dtype=torch.float32, device=sets.device)
    return out.scatter_(1, sets, 1.0)


def overlaps(query: torch.Tensor, stored_1hot: torch.Tensor) -> torch.Tensor:
    """``|M_q ∩ M_e| / k`` for query sets ``[m, k]`` against one-hot stored sets ``[n, d]`` -> ``[m, n]``."""
    k = query.shape[-1]
    return one_hot_sets(query, stored_1hot.shape[1]) @ stored_1hot.T / k  # integer counts, exact in float32


def residual_matrix(masks: torch.Tensor, u: torch.Tensor, v: torch.Tensor, d: int,
                    start: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """``W' = start + Σ_e scatter(U_e V_e → columns M_e)`` (``start`` default 0), added in entry order
    so a W' grown batch by batch equals one rebuilt from all entries (deterministic on CPU). Blocks are
    formed ``chunk`` entries at a time: 10,000 full blocks would take 1.5 GB on SmolLM2."""
    n, d_out = u.shape[0], u.shape[1]
    out = torch.zeros(d_out, d, dtype=torch.float32) if start is None else start.float().cpu().clone()
    for i in range(0, n, chunk):
        b = (u[i: i + chunk].float().cpu() @ v[i: i + chunk].float().cpu())  # [c, d_out, k]
        c, _, k = b.shape
        out.index_add_(1, masks[i: i + chunk].reshape(-1).cpu(), b.permute(1, 0, 2).reshape(d_out, c * k))
    return out


def warm_start(targets: list[str | None], vstars: torch.Tensor, wanted: list[str]) -> tuple[torch.Tensor, int]:
    """Each wanted object's start for v*: the direction of the mean of ``vstars`` ``[entries, d]`` over
    the entries whose object (``targets``, ``None``: unknown) is the same after stripping, at their mean
    norm (averaging vectors that agree only in part shortens them; at full length the start is 0.5
    Adam steps closer), else zeros; and how many of ``wanted`` found one. Entries are averaged in entry
    order, so the start is the same on every run."""
    rows: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        if t is not None:
            rows.setdefault(t.strip(), []).append(i)
    out = torch.zeros(len(wanted), vstars.shape[1], dtype=torch.float32)
    hits = 0
    for j, t in enumerate(wanted):
        idx = rows.get(t.strip())
        if idx:
            rows_j = vstars.index_select(0, torch.tensor(idx)).float()
            mean = rows_j.mean(0)
            out[j] = mean * (rows_j.norm(dim=1).mean() / mean.norm().clamp_min(1e-12))
            hits += 1
    return out, hits


@dataclass
class MemoryReadout:
    """Which tokens fire which entry: ``tokens`` (flat indices), ``entry`` per firing token."""

    tokens: torch.Tensor
    entry: torch.Tensor
    best_overlap: torch.Tensor  # [N] best overlap of every token with an entry it may read (diagnostics)
    exact: torch.Tensor  # per firing token: True where it reads its entry through the entry's exact key


@dataclass
class SpanGuard:
    """The span keys of a memory and what each token had before it.

    ``prev`` ``[N, d]`` is the down-projection input at the token before each token (any value where
    ``has_prev`` is False: the first token of a text); ``keys_1hot`` ``[entries, d]`` the entries' span
    keys, ``guarded`` ``[entries]`` which entries have one (a subject of several tokens)."""

    prev: torch.Tensor
    has_prev: torch.Tensor
    keys_1hot: torch.Tensor
    guarded: torch.Tensor
    threshold: float


def read_memory(x: torch.Tensor, bg: torch.Tensor, perm: torch.Tensor, stored_1hot: torch.Tensor, k: int,
                threshold: float, exact_1hot: torch.Tensor | None = None, exact_threshold: float = 1.0,
                span: SpanGuard | None = None) -> MemoryReadout:
    """Per-token retrieval for ``x`` ``[N, d]``: the best entry of each token and whether it fires.

    A token fires the entry whose mask it overlaps most if that overlap reaches ``threshold``; with
    span keys, a guarded entry counts for a token only if the token before it overlaps the entry's
    span key by ``span.threshold`` (the first token of a text reads no guarded entry); with exact keys
    (``exact_1hot``, one row per entry), a token whose best exact-key overlap reaches
    ``exact_threshold`` fires that entry instead, whatever its mask or span overlaps."""
    n = stored_1hot.shape[0]
    if n == 0 or x.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return MemoryReadout(empty, empty, torch.zeros(x.shape[0], device=x.device),
                             torch.zeros(0, dtype=torch.bool, device=x.device))
    query = fingerprint(x, bg, perm, k)
    ov = overlaps(query, stored_1hot)
    if span is not None and bool(span.guarded.any()):
        prev_ok = overlaps(fingerprint(span.prev, bg, perm, k), span.keys_1hot) >= span.threshold
        allowed = ~span.guarded[None, :] | (prev_ok & span.has_prev[:, None])
        ov = torch.where(allowed, ov, torch.full_like(ov, -1.0))
    best, entry = ov.max(dim=1)  # max returns the first maximal index: ties go to the older entry
    hit = best >= threshold
    exact = torch.zeros_like(hit)
    if exact_1hot is not None and exact_1hot.shape[0]:
        best_x, entry_x = overlaps(query, exact_1hot).max(dim=1)
        exact = best_x >= exact_threshold
        entry, hit = torch.where(exact, entry_x, entry), hit | exact
    fire = hit.nonzero().squeeze(1)
    return MemoryReadout(fire, entry[fire], best.clamp_min(0.0), exact[fire])


def previous_tokens(x: torch.Tensor, carry: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input at the token before each token of ``x`` ``[B, T, d]``, flattened to ``[B·T, d]``, and
    whether there is one: within the call the row's previous position; at position 0 the last token of
    the call this one continues (``carry`` ``[B, d]``, KV-cache decoding) or none."""
    b, t, d = x.shape
    first = carry.to(x.dtype) if carry is not None else torch.zeros(b, d, dtype=x.dtype, device=x.device)
    prev = torch.cat([first[:, None, :], x[:, :-1]], dim=1).reshape(b * t, d)
    has = torch.ones(b, t, dtype=torch.bool, device=x.device)
    if carry is None:
        has[:, 0] = False
    return prev, has.reshape(b * t)


def own_block_delta(x: torch.Tensor, cols: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``U_e V_e · x[M_e]`` per row, each row reading only its entry's own block: ``x`` ``[m, d]``, ``cols``
    ``[m, k]``, ``u`` ``[m, d_out, r]``, ``v`` ``[m, r, k]`` (the rows' entries) -> ``[m, d_out]``."""
    xs = x.gather(1, cols).float()
    return torch.bmm(u.float(), torch.bmm(v.float(), xs[:, :, None]))[:, :, 0]


def memory_delta(x: torch.Tensor, cols: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``W'[:, M_e] · x[M_e]`` per row: ``x`` ``[m, d]``, ``cols`` ``[m, k]``, ``w`` ``[d_out, d]`` -> ``[m, d_out]``."""
    xs = x.gather(1, cols).float()
    return torch.einsum("omk,mk->mo", w[:, cols], xs)


def closed_form_blocks(target: torch.Tensor, xsel: torch.Tensor, w_old: torch.Tensor, ridge: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's block ``B = U V`` (``U`` [n, d_out, ctx], ``V`` [n, ctx, k]) such that
    ``(W'_old + B) · x_c[M] ≈ target`` in every context ``c``: the ridge least-squares solution ``B = R (XᵀX + λI)⁻¹ Xᵀ`` with ``X`` = the contexts'
    masked inputs ``xsel`` [n, ctx, k], ``R`` = ``target`` [n, d_out] minus what ``W'_old`` [n, d_out, k]
    already gives, and ``λ = ridge`` × the mean ``‖x_c[M]‖²`` (scale-free). With ``λ = 0`` and
    independent contexts it fits every context exactly with the least-norm block. Kept as the two
    factors ``U = Rᵀ``, ``V = (XᵀX + λI)⁻¹Xᵀ``: ``(d_out + k) · ctx`` numbers per fact, not ``d_out · k``."""
    x = xsel.double()
    r = target.double()[:, None, :] - torch.einsum("nok,nck->nco", w_old.double(), x)  # [n, ctx, d_out]
    gram = x @ x.transpose(1, 2)  # [n, ctx, ctx]
    lam = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + lam[:, None, None] * eye, x)  # [n, ctx, k]
    return r.transpose(1, 2).float(), coef.float()
