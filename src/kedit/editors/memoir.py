"""Sparse residual memory (MEMOIR-style): edits live in a zero-initialised matrix W' beside one MLP
down-projection, written and read only through sparse, input-dependent column masks.

Why: weight editors overwrite directions that general text also uses; here the base weights never
change, and a token that matches no stored edit runs exactly the base computation.

Mechanics (layer ``L``, down-projection input ``x`` of width ``d``, output width ``d_out``):

- **Fingerprint of one token**: ``perm[top_k(x - μ)]`` as a sorted index set, where ``μ`` is the mean
  down-projection input over general text (``mm_bg_docs`` documents of the statistics corpus, kept
  in the state) and ``perm`` a fixed seeded permutation of the ``d`` columns. Subtracting ``μ`` drops
  the features every token has; the top-k of what is left says what is particular to this token.
  The permutation maps that set to the columns of W' the edit reads and writes, so an edit's
  residual is not driven by the same few features general text drives hardest. A bijection keeps
  overlaps: it changes which columns carry an edit, not how many columns two edits share.
- **One entry per fact, at the subject**: MEMOIR fingerprints the prompt's mean activation at a
  late layer. On SmolLM2 that key does not separate facts: a neighbourhood prompt (same relation,
  another subject) overlaps a stored mask more than the fact's own paraphrase does (docs/editing.md,
  "Sparse residual memory"). The subject's last token does separate them, so each fact stores one
  entry there: ``M_e`` = the fingerprint of ``x - μ`` at the subject's last token averaged over the
  bare prompt and its random-prefix contexts, its block ``B_e`` (``[d_out, k]``, the fact's own
  contribution) and the fact id that owns it. ``W' = Σ_e scatter(B_e → columns M_e)``
  (:func:`residual_matrix`): entries of different facts may share columns, as in MEMOIR's shared memory.
- **Reading, per token**: every token's own fingerprint is compared with every entry's ``M_e``;
  the best entry ``e*`` (largest overlap ``|M_q ∩ M_e| / k``, the older entry on ties) is read when
  its overlap is at least ``mm_threshold``: that token's down-projection output gains its entry's
  own block's output ``U_e* V_e* · x[M_e*]`` (``mm_read: own``, shipped) or, as in MEMOIR, the shared
  ``W'[:, M_e*] · x[M_e*]`` (``mm_read: shared``: every block written on those columns). SmolLM2's
  down-projection has only 1,536 columns, so at k = 64 each column carries the blocks of about one
  fact in 24: by 70 facts the shared read carries as much of other facts' blocks as of the matched
  one, and efficacy fell from 0.95 (20 edits) to 0.89 (70) in the lifelong benchmark; the own read
  keeps facts apart. Every other token's output is left untouched (bit for bit the base).
  The decision uses the token's own activation only, so it is the same in a padded batch, alone,
  with or without a KV cache. **Free generation**: the prompt's subject token fires in the prefill;
  its changed keys and values stay in the cache, so every generated token sees the edited subject,
  and each generated token decides for itself (it fires only if it is itself a stored subject).
  **Perplexity scoring**: each token of each window decides on its own; a window in which no token
  is (close to) a stored subject runs the base model exactly.
- **Exact keys** (``mm_exact_key``): each entry also keeps ``X_e``, the fingerprint of its own prompt
  without a prefix, and a token whose overlap with some ``X_e`` reaches ``mm_exact_threshold`` (0.95)
  reads entry ``e`` whatever its mask overlap. Why: SmolLM2 has no BOS token, so in the bare prompt the
  subject sits next to the attention sink and its activation is unlike its prefixed contexts; the
  context-averaged mask is dominated by the prefixed ones, and on CounterFact dev 0-199 every fact
  that failed on its own prompt (11 of 200) overlapped its own mask there by only 0.14-0.34 (0.62-0.94
  in the prefixed contexts). The same key serves every text that starts the same way up to the
  subject (most paraphrases). It must be strict: tokens at the very start of a text all look alike at
  this layer and overlap the exact keys up to 0.8; read at 0.8 they fired on 0.3% of held-out wiki
  tokens and perplexity rose 42%, at 0.9-0.95 none fired (docs/editing.md).
- **Span keys** (``mm_span_key``): the fingerprint of a subject's last token is dominated by that
  token, so an entry fired on other names that end the same way: with 2,800 CounterFact facts stored,
  "Adi Shankar" read "Ravi Shankar", "Johann Sebastian Bach" read "Carl Philipp Emanuel Bach", "the
  Nobel Prize" read "Sydney Peace Prize"; such partial matches were 34 of the 48 entries that fired on
  10,000 held-out wiki tokens and 70% of the perplexity change (docs/editing.md). An entry whose
  subject spans several tokens therefore also keeps ``P_e``, the fingerprint of the token before the
  subject's last one (context-averaged), and a token reads it through its mask only if the token
  before it overlaps ``P_e`` by ``mm_span_threshold``; the best entry is taken among those it may
  read. The token before position 0 of a call is the previous call's last token when the call
  continues a KV cache (a pre-hook on the whole model sees the cache), otherwise there is none and no
  guarded entry fires there: decoding with a cache decides as the full forward does. (Beam search,
  which reorders cached rows, is not followed.) Exact keys are not guarded.
- **Read shares** (``mm_read_scale``, ``mm_exact_read_scale``, ``mm_read_scale_by_entries``): a token
  that reads an entry through its mask adds ``mm_read_scale`` of the entry's output change, one that
  reads it through the exact key ``mm_exact_read_scale`` (the text begins as the edit's own prompt,
  up to the subject: what v* was fitted for). General text reads entries too: mostly where it names
  an edited subject ("ambassador to France" with France's entry), which no reading rule can tell
  from a question about the edited fact; each such read changes the text after it, and the more
  entries, the more such reads. ``mm_read_scale_by_entries`` therefore lowers the mask reads' share
  as the memory grows (the state keeps the schedule; the share follows its own number of entries, so
  older facts read more softly too). On SmolLM2 with 10,000 CounterFact entries a mask share of 0.7
  took held-out perplexity from +11.5% to +3.4% for generalization 0.890 -> 0.844, efficacy staying
  at 0.986 through the exact keys (docs/editing.md, "Read shares"). Reading never changes writing.
- **Writing** (``mm_solver: vstar``, shipped): the batch's v* at layer ``L`` (the change of the
  layer's output at the subject's last token that makes every prompt context predict the target,
  optimised exactly as the weight editors do, in one batched forward/backward per step) is written
  into each request's block in closed form, ``B · x_c[M] ≈ δ`` in every context ``c`` (with the
  shared read ``(W'_prev[:, M] + B) · x_c[M] ≈ δ``; ridge least squares over the contexts,
  :func:`closed_form_blocks`). v* moves one
  ``d_out``-vector per request where Adam on the block moves ``d_out × k`` numbers, and it is shared
  with AlphaEdit's code path: on SmolLM2 it needs 4-19 steps where the block needed up to 40, at a
  tenth of the time per edit (docs/editing.md).
- **Writing** (``mm_solver: adam``, MEMOIR's way): each request gets a fresh block ``B = 0``; its
  row in every context gets ``B · x[M]`` (shared read: ``(W'_prev[:, M] + B) · x[M]``) added at the
  subject's last token, and Adam minimises the mean target NLL over the contexts, one forward/backward for the whole batch (only the blocks above
  ``L`` and the tokens from the subject on are replayed). The block is trained in units of
  ``1/‖x̄[M]‖`` so ``mm_lr`` means the same on every model. Losses are summed over requests and each
  request owns its block; a request that reaches ``mm_stop_nll`` freezes (block and Adam moments),
  so a batch gives each request the block it would get alone from the same state (tested).
- **Warm start** (``mm_warm_start``): CounterFact's and a nightly feed's new objects repeat (93% of
  the first 10,000 CounterFact dev edits name an object an earlier one named: "French", "London").
  Each entry keeps its v* and its object; a request whose object some entries have starts Adam from
  their mean v* (rescaled to their mean norm) instead of 0 (the KL term and the weight decay still
  measure from the unedited model), and reaches its stop in fewer steps: with CounterFact dev 0-899
  stored, the 86 of dev 900-999 whose object is among them took 2.8 Adam steps instead of 7.6
  (docs/editing.md, speed).
- **Retraction** (:func:`retract`): drop a fact's entry (mask, exact key, block and v*) and recompute W' from the
  remaining blocks. The fact's prompts then read no entry unless another fact's subject matches
  them, and where they read none they run the base model bit for bit. Other facts keep their
  blocks; with the own read their outputs do not change at all (tested), with the shared read they
  lose the removed fact's contribution on the columns they shared with it.

State (``EditorState.tensors``): ``mm.W`` (W', float32 ``[d_out, d]``), ``mm.masks`` (int64
``[entries, k]``), ``mm.exact`` (int64 ``[entries, k]``, the exact keys), ``mm.block_u`` / ``mm.block_v`` (float32 ``[entries, d_out, r]`` / ``[entries, r, k]``,
each entry's block as ``U V``: ``r = contexts`` for the closed form, ``r = k`` for Adam; the price
of exact retraction, ``4·(d_out + k)·r`` bytes per fact), ``mm.bg_mean`` (float32 ``[d]``),
``mm.perm`` (int64 ``[d]``), ``mm.span`` / ``mm.span_on`` (int64 ``[entries, k]`` / bool ``[entries]``, the
span keys and which entries have one), ``mm.vstar`` (float32 ``[entries, d_out]``, each entry's v*,
with ``mm_warm_start``). ``meta``: ``layer``, ``k``, ``rank``, ``read``, ``threshold``,
``exact_threshold``, ``span_threshold``, the read shares (``read_scale`` or ``read_scale_by_entries``, and
``exact_read_scale``; absent at 1.0),
``entry_owner`` (fact id per entry), ``entry_target`` (new object per entry, with ``mm_warm_start``;
``null`` for entries written without it) and the edit counters. Deltas are always empty: the base
weights never change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import islice

import torch

from kedit.editors import attach as _attach
from kedit.editors.base import EditorState, EditRequest, EditResult, RequestDiagnostics
from kedit.editors.common import check_requests
from kedit.editors.context import context_prefixes
from kedit.editors.hparams import EditHparams
from kedit.editors.prompts import pad_right, subject_rows, target_ids
from kedit.editors.runner import unembed_states
from kedit.hooks import Trace

METHOD = "memoir"
W, MASKS, BG, PERM = "mm.W", "mm.masks", "mm.bg_mean", "mm.perm"
BLOCK_U, BLOCK_V = "mm.block_u", "mm.block_v"  # entry e's block is U_e @ V_e
EXACT = "mm.exact"  # entry e's exact key: the fingerprint of its own prompt, without a prefix
# entry e's span key: the fingerprint of the token before its subject's last token (context-averaged),
# and whether it has one (its subject spans several tokens)
SPAN, SPAN_ON = "mm.span", "mm.span_on"
VSTAR = "mm.vstar"  # entry e's v*: where a later edit to the same object starts its own (``mm_warm_start``)


# --- pure functions ------------------------------------------------------------------------------
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


def block_rank(hp: EditHparams) -> int:
    """Rank of the stored blocks: the closed form's block lies in the span of the prompt contexts'
    inputs (one per context), Adam's is a full ``[d_out, k]`` block."""
    return hp.n_prefixes + 1 if hp.mm_solver == "vstar" else hp.mm_k


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


# --- the live attachment -------------------------------------------------------------------------
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
    any memory attached before. Tokens that fire no entry leave the module's output untouched."""
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

    def hook(_module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
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
            return output
        cols = masks[rd.entry]
        delta = own_block_delta(flat[rd.tokens], cols, u[rd.entry], v[rd.entry]) if own else \
            memory_delta(flat[rd.tokens], cols, w)
        if scale != 1.0 or scale_x != 1.0:
            delta = delta * torch.where(rd.exact, scale_x, scale).to(delta.dtype)[:, None]
        out = output.reshape(-1, output.shape[-1]).clone()
        out[rd.tokens] = out[rd.tokens] + delta.to(out.dtype)
        return out.view_as(output)

    extra = (("", "pre", model_pre), ("", "post", model_post)) if spans is not None else ()
    return _attach.install(lm.model, METHOD, lm.adapter.mlp_out_name(layer), hook, extra)


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


def retract(state: EditorState, fact_id: str) -> EditorState:
    """A new state without ``fact_id``'s entries (masks and blocks) and with W' recomputed from the rest."""
    owners = list(state.meta.get("entry_owner", []))
    if fact_id not in owners:
        raise KeyError(f"fact {fact_id!r} has no entry in this memory (facts: {sorted(set(owners))[:10]}...)")
    new = select_entries(state, [i for i, o in enumerate(owners) if o != fact_id])
    new.tensors[W] = residual_matrix(new.tensors[MASKS], new.tensors[BLOCK_U], new.tensors[BLOCK_V],
                                     state.tensors[BG].shape[0])
    new.meta = {**new.meta, "n_edits": int(state.meta.get("n_edits", 0)) - 1,
                "retracted": [*state.meta.get("retracted", []), fact_id]}
    return new


def select_entries(state: EditorState, keep: list[int]) -> EditorState:
    """A copy of ``state`` holding only the entries ``keep`` (in that order): their masks, keys, blocks
    and v*, owners and objects. W' is left as it was (rebuild it with :func:`residual_matrix` where the
    shared read needs it)."""
    new = state.copy()
    idx = torch.tensor(keep, dtype=torch.long)
    for key in (MASKS, BLOCK_U, BLOCK_V, EXACT, SPAN, SPAN_ON, VSTAR):
        if key in state.tensors:
            new.tensors[key] = state.tensors[key].index_select(0, idx)
    for key in ("entry_owner", "entry_target"):
        if key in state.meta:
            new.meta[key] = [state.meta[key][i] for i in keep]
    return new


# --- state set-up --------------------------------------------------------------------------------
def memory_layer(hp: EditHparams, num_layers: int) -> int:
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


def initial_state(lm, hp: EditHparams, texts: list[str] | None = None) -> EditorState:
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


def _check_state(state: EditorState, lm, hp: EditHparams) -> None:
    if state.method != METHOD:
        raise ValueError(f"editor state is for {state.method!r}, not {METHOD!r}")
    want = {"layer": memory_layer(hp, lm.adapter.num_layers), "k": hp.mm_k, "rank": block_rank(hp),
            "read": hp.mm_read,
            "model_hash": lm.manifest.model_hash}
    bad = {k: (state.meta.get(k), v) for k, v in want.items() if state.meta.get(k) != v}
    if bad:
        raise ValueError(f"memoir state does not fit these hparams/model: {bad} (state, now)")


# --- the editor ----------------------------------------------------------------------------------
class MemoirEditor:
    """``compute`` writes a batch into the sparse residual memory; the model's weights never change."""

    method = METHOD

    def __init__(self, hparams: EditHparams, cache_dir=None, progress=None) -> None:
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

    def compute(self, lm, requests: list[EditRequest], state: EditorState | None = None, stats=None
                ) -> EditResult:
        """``stats`` is not used: the memory needs only its own background mean (kept in the state)."""
        t0 = time.perf_counter()
        check_requests(requests)
        hp = self.hp
        # a shallow copy: every tensor of the new state is built anew below (cat, W' from a clone), so the
        # caller's state is never written and a large memory is not cloned once per batch
        state = initial_state(lm, hp, self.background_texts) if state is None else \
            EditorState(state.method, dict(state.tensors), dict(state.meta))
        _check_state(state, lm, hp)
        layer, k = int(state.meta["layer"]), int(state.meta["k"])
        prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, self.cache_dir)
        with _attach.suspended(lm.model, METHOD):
            wr = _train(lm, requests, prefixes, state, layer, k, hp, self.progress)
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
        if hp.mm_read_scale_by_entries is not None or hp.mm_read_scale != 1.0 or hp.mm_exact_read_scale != 1.0:
            state.meta["exact_read_scale"] = hp.mm_exact_read_scale
        state.meta.update(entry_owner=[*state.meta["entry_owner"], *owners], threshold=hp.mm_threshold,
                          n_edits=int(state.meta.get("n_edits", 0)) + len(requests),
                          n_batches=int(state.meta.get("n_batches", 0)) + 1, hparams_sha256=hp.source_sha256)
        info = {"memory": {"entries": float(new_masks.shape[0]), "w_norm": float(state.tensors[W].norm()),
                           "warm_started": float(wr.warm),
                           "state_bytes": float(sum(t.numel() * t.element_size() for t in state.tensors.values()))}}
        return EditResult(deltas={}, state=state, diagnostics=diags, layer_info=info,
                          seconds=time.perf_counter() - t0)


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


def with_span_keys(lm, state: EditorState, requests: list[EditRequest], hp: EditHparams, cache_dir=None
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


@dataclass
class _Written:
    """What :func:`_train` found for a batch: blocks ``(U, V)``, masks, exact keys, diagnostics, the
    memory layer's input at the token before each context's subject (``[n, contexts, d]`` when v*'s
    first pass read it), the batch's v* and how many requests started from a stored one."""

    uv: tuple[torch.Tensor, torch.Tensor]
    masks: torch.Tensor
    exact: torch.Tensor
    diags: list[RequestDiagnostics]
    before: torch.Tensor | None = None
    vstar: torch.Tensor | None = None
    warm: int = 0


def _train(lm, requests, prefixes, state: EditorState, layer: int, k: int, hp: EditHparams, progress
           ) -> _Written:
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
        return _Written(uv, masks, exact, diags, before, vs.delta, warm)
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
            logp = torch.log_softmax(unembed_states(lm, out[local[pr[pm]], pc[pm]]), -1)
            nll = nll.index_add(0, pq[pm], -logp.gather(1, pl[pm][:, None]).squeeze(1) * pw[pm])
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
    return _Written((blocks, eye), masks, exact, diags)


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


def _blocks_from_vstar(vs, hp: EditHparams, xsel: torch.Tensor, w_old: torch.Tensor):
    """The batch's v* at the memory layer (on the model without the memory: the subject token of a new
    fact reads its own entry, not an older one), written into each request's block in closed form."""
    u, v = closed_form_blocks(vs.delta.to(xsel.device), xsel, w_old, hp.mm_ridge)
    return (u, v), [replace(d, delta_norm=float((a @ b).norm())) for d, a, b in zip(vs.diagnostics, u, v)]
