"""How well subject fingerprints separate, measured on a model: the memory's layer, k and its three
read thresholds come from here.

For each candidate layer the memory's own rules are replayed without writing anything (the
fingerprint of a token is ``top_k(x - μ)`` of the down-projection input, :mod:`kedit.editors.memoir`;
the column permutation is a bijection and changes no overlap, so it is left out):

- **stored** per calibration fact: its mask (the subject's last token, averaged over the bare prompt
  and the random-prefix contexts), its exact key (the bare prompt's) and, for subjects of several
  tokens, its span key (the token before the subject's last, context-averaged);
- **positives**: each fact's paraphrase, at the subject's last token, against its own mask (what
  generalization needs to read), and the token before it against its own span key;
- **negatives**: every token of the neighbourhood prompts (same relation, another subject: what
  specificity needs left alone) and of general text (statistics-corpus documents after the ones the
  background mean reads: what perplexity needs left alone), each with its best overlap over all
  stored masks and all exact keys, and, where it would fire a guarded entry, the overlap of the token
  before it with that entry's span key.

Activations are reduced on the spot to each token's top-``k_max`` columns (sorted by value), so
every ``k <= k_max`` is a prefix of the same list and the measurement for several k costs one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch

from kedit.calibration.thresholds import (
    Separation,
    highest_threshold_keeping,
    lowest_threshold_for_rate,
    quantiles,
    separation,
    share_at_or_above,
)
from kedit.editors.base import EditRequest
from kedit.editors.prompts import pad_right, subject_rows
from kedit.hooks import Trace


@dataclass
class LayerActivations:
    """One layer's top-``k_max`` column lists (int64, most active first) for every measured token."""

    layer: int
    d: int
    ctx: torch.Tensor  # [n, k_max] of the context-mean subject input (the mask's source)
    bare: torch.Tensor  # [n, k_max] the bare prompt's subject input (the exact key's source)
    span: torch.Tensor  # [n, k_max] context-mean input at the token before the subject's last
    guarded: torch.Tensor  # [n] bool: the subject spans several tokens in every context
    para: torch.Tensor  # [p, k_max] paraphrases at the subject's last token
    para_prev: torch.Tensor  # [p, k_max] ... at the token before it
    para_owner: torch.Tensor  # [p] the fact each paraphrase belongs to
    para_multi: torch.Tensor  # [p] bool: the paraphrase's subject spans several tokens
    neigh: torch.Tensor  # [m, k_max] every token of the neighbourhood prompts
    neigh_prev: torch.Tensor  # [m, k_max] the token before each (row 0 of a prompt: itself, unused)
    neigh_has_prev: torch.Tensor  # [m] bool
    neigh_prompt: torch.Tensor  # [m] which prompt each token belongs to
    general: torch.Tensor  # [g, k_max] general-text tokens
    general_has_prev: torch.Tensor  # [g] bool (the previous row is the token before)


def top_columns(x: torch.Tensor, bg: torch.Tensor, k_max: int) -> torch.Tensor:
    """``top_k(x - bg)`` column indices of each row, most active first (``[..., k_max]`` int64)."""
    return torch.topk(x.float() - bg.to(x.device, torch.float32), k_max, dim=-1).indices.cpu()


def set_overlaps(query: torch.Tensor, stored: torch.Tensor, d: int, chunk: int = 4096) -> torch.Tensor:
    """``|A_i ∩ B_j| / k`` for column sets ``query`` ``[m, k]`` and ``stored`` ``[n, k]`` -> ``[m, n]``."""
    k = query.shape[1]
    s = torch.zeros(stored.shape[0], d).scatter_(1, stored, 1.0)
    out = []
    for i in range(0, query.shape[0], chunk):
        q = torch.zeros(min(chunk, query.shape[0] - i), d).scatter_(1, query[i: i + chunk], 1.0)
        out.append(q @ s.T / k)
    return torch.cat(out) if out else torch.zeros(0, stored.shape[0])


def best_overlap(query: torch.Tensor, stored: torch.Tensor, d: int, chunk: int = 4096
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query set's best overlap with any stored set, and which (the first on ties, as the memory reads)."""
    k = query.shape[1]
    s = torch.zeros(stored.shape[0], d).scatter_(1, stored, 1.0)
    best, arg = [], []
    for i in range(0, query.shape[0], chunk):
        q = torch.zeros(min(chunk, query.shape[0] - i), d).scatter_(1, query[i: i + chunk], 1.0)
        b, a = (q @ s.T / k).max(dim=1)
        best.append(b), arg.append(a)
    if not best:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(best), torch.cat(arg)


def own_overlap(query: torch.Tensor, stored: torch.Tensor, owner: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Overlap of each query set with its own fact's stored set (``owner`` indexes ``stored``)."""
    k = query.shape[1]
    out = [(q[:, :, None] == stored[o][:, None, :]).any(2).sum(1).double() / k
           for q, o in zip(query.split(chunk), owner.split(chunk))]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# --- collecting activations ---------------------------------------------------------------------------
def forward_inputs(lm, names: Sequence[str], seqs: list[list[int]], picks: list[list[int]], chunk: int = 32,
                   tick: Callable[[int], None] | None = None) -> dict[str, list[torch.Tensor]]:
    """Module inputs at positions ``picks[i]`` of each sequence: ``{name: [rows of seq i: [len(picks[i]), d]]}``."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    got: dict[int, dict[str, torch.Tensor]] = {}
    for c in range(0, len(order), chunk):
        idx = order[c: c + chunk]
        with torch.no_grad(), Trace(lm.model, names, retain_input=True, stop=True) as tr:
            lm.model(input_ids=pad_right([seqs[i] for i in idx], pad, lm.device), use_cache=False)
        for j, i in enumerate(idx):
            got[i] = {n: tr.inputs[n][j, picks[i]].float().cpu() for n in names}
        if tick:
            tick(len(idx))
    for i in range(len(seqs)):
        for n in names:
            out[n].append(got[i][n])
    return out


def background_means(lm, layers: Sequence[int], texts: Sequence[str], seq_len: int = 128) -> dict[int, torch.Tensor]:
    """:func:`kedit.editors.memoir.background_mean` for several layers in one pass over ``texts`` (the same
    sums in the same order, so the same values): the memory subtracts it before taking a fingerprint."""
    names = {layer: lm.adapter.mlp_out_name(layer) for layer in layers}
    total = {layer: torch.zeros(lm.adapter.key_dim(layer), dtype=torch.float64) for layer in layers}
    count = 0
    for t in texts:
        ids = lm.tokenizer(t, add_special_tokens=False, truncation=True, max_length=seq_len,
                           return_tensors="pt").input_ids.to(lm.device)
        if ids.shape[1] == 0:
            continue
        with torch.no_grad(), Trace(lm.model, list(names.values()), retain_input=True, stop=True) as tr:
            lm.model(input_ids=ids, use_cache=False)
        for layer, name in names.items():
            total[layer] += tr.inputs[name][0].double().sum(0).cpu()
        count += ids.shape[1]
    if count == 0:
        raise ValueError("calibration: the background texts produced no tokens")
    return {layer: (v / count).float() for layer, v in total.items()}


def general_token_ids(lm, texts: Sequence[str], max_tokens: int, window: int = 512) -> list[list[int]]:
    """``texts`` joined (blank line between) and cut into windows of ``window`` tokens, at most
    ``max_tokens`` in all: each window is read as a fresh text, as perplexity reads its reference."""
    ids = lm.tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids[:max_tokens]
    return [list(ids[i: i + window]) for i in range(0, len(ids), window)]


def collect(lm, layers: Sequence[int], requests: list[EditRequest], prefixes: list[str], bg: dict[int, torch.Tensor],
            general: list[list[int]], k_max: int, progress: Callable[[str, int, int], None] | None = None
            ) -> dict[int, LayerActivations]:
    """Run the model over the facts' prompt contexts, paraphrases, neighbourhood prompts and the general
    text once, keeping every candidate layer's top-``k_max`` columns at the tokens the memory reads."""
    tok = lm.tokenizer
    names = [lm.adapter.mlp_out_name(layer) for layer in layers]
    n, n_ctx = len(requests), len(prefixes)
    rows = subject_rows(tok, requests, prefixes)
    # paraphrases that name the subject as written (CounterFact's nearly all do): subject's last token
    para_req, para_owner = [], []
    for i, r in enumerate(requests):
        for p in r.paraphrases:
            if r.subject in p:
                para_req.append(EditRequest(prompt=p.replace(r.subject, "{}", 1), subject=r.subject,
                                            target_new=r.target_new, id=r.id))
                para_owner.append(i)
    prow = subject_rows(tok, para_req, [""]) if para_req else None
    neigh_texts = [(i, t) for i, r in enumerate(requests) for t in r.neighbors]
    neigh_ids = [tok(t, add_special_tokens=False).input_ids for _, t in neigh_texts]
    neigh_ids = [x for x in neigh_ids if x]

    seqs, picks = [], []
    for ids, pos in zip(rows.ids, rows.subj_pos):  # [pos, pos - 1]
        seqs.append(ids[: pos + 1]), picks.append([pos, max(pos - 1, 0)])
    n_para = len(para_req)
    if prow is not None:
        for ids, pos in zip(prow.ids, prow.subj_pos):
            seqs.append(ids[: pos + 1]), picks.append([pos, max(pos - 1, 0)])
    for ids in neigh_ids:
        seqs.append(ids), picks.append(list(range(len(ids))))
    for ids in general:
        seqs.append(ids), picks.append(list(range(len(ids))))
    total = len(seqs)
    done = [0]

    def tick(m: int) -> None:
        done[0] += m
        if progress:
            progress("activations", done[0], total)

    got = forward_inputs(lm, names, seqs, picks, tick=tick)
    out = {}
    multi = torch.tensor([f < p for f, p in zip(rows.subj_first, rows.subj_pos)]).view(n, n_ctx)
    p_multi = torch.tensor([f < p for f, p in zip(prow.subj_first, prow.subj_pos)]) if prow is not None \
        else torch.zeros(0, dtype=torch.bool)
    a, b = n * n_ctx, n * n_ctx + n_para
    for layer, name in zip(layers, names):
        xs, mu = got[name], bg[layer]
        d = xs[0].shape[-1]
        ctx = torch.stack([x[0] for x in xs[:a]]).view(n, n_ctx, d)
        prev = torch.stack([x[1] for x in xs[:a]]).view(n, n_ctx, d)
        para = [x for x in xs[a:b]]
        neigh = xs[b: b + len(neigh_ids)]
        gen = xs[b + len(neigh_ids):]
        nt = torch.cat(neigh) if neigh else torch.zeros(0, d)
        n_prompt = torch.cat([torch.full((x.shape[0],), j) for j, x in enumerate(neigh)]) if neigh \
            else torch.zeros(0, dtype=torch.long)
        n_has = torch.cat([torch.arange(x.shape[0]) > 0 for x in neigh]) if neigh else torch.zeros(0, dtype=torch.bool)
        n_top = top_columns(nt, mu, k_max)
        n_prev = torch.cat([n_top[:1], n_top[:-1]]) if n_top.shape[0] else n_top
        gt = torch.cat(gen) if gen else torch.zeros(0, d)
        g_has = torch.cat([torch.arange(x.shape[0]) > 0 for x in gen]) if gen else torch.zeros(0, dtype=torch.bool)
        out[layer] = LayerActivations(
            layer=layer, d=d, ctx=top_columns(ctx.mean(1), mu, k_max), bare=top_columns(ctx[:, 0], mu, k_max),
            span=top_columns(prev.mean(1), mu, k_max), guarded=multi.all(1),
            para=top_columns(torch.stack([x[0] for x in para]), mu, k_max) if para else torch.zeros(0, k_max, dtype=torch.long),
            para_prev=top_columns(torch.stack([x[1] for x in para]), mu, k_max) if para
            else torch.zeros(0, k_max, dtype=torch.long),
            para_owner=torch.tensor(para_owner, dtype=torch.long), para_multi=p_multi,
            neigh=n_top, neigh_prev=n_prev, neigh_has_prev=n_has, neigh_prompt=n_prompt,
            general=top_columns(gt, mu, k_max), general_has_prev=g_has)
    return out


# --- what the measurements say -------------------------------------------------------------------------
@dataclass
class Budgets:
    """How much each kind of negative may read the memory (shares at the measured number of entries)."""

    general_per_1000: float = 0.001  # share of general-text tokens firing per 1,000 stored entries
    neighbour: float = 0.02  # share of neighbourhood prompts with any token firing
    exact_general: float = 0.0  # share of general-text and neighbourhood tokens firing an exact key
    span_keep: float = 0.95  # share of multi-token paraphrases the span guard must still let read

    def general(self, entries: int) -> float:
        return self.general_per_1000 * entries / 1000.0


@dataclass
class SettingResult:
    """One (layer, k): the thresholds the budgets allow and what each keeps and lets fire."""

    layer: int
    k: int
    threshold: float
    recall: float  # paraphrases reading their own entry at the threshold
    general_fire: float  # share of general-text tokens reading some entry
    neighbour_fire: float  # share of neighbourhood prompts with a token reading some entry
    exact_threshold: float
    span_threshold: float
    recall_guarded: float  # paraphrases still reading their own entry with the span guard on
    general_fire_guarded: float
    bare_recall: float  # bare prompts reading their own entry through the mask
    separation_general: Separation
    distributions: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("separation_general", "distributions")}
        out["margin_general"] = self.separation_general.margin
        return out


def measure_setting(acts: LayerActivations, k: int, budgets: Budgets, keep: bool = False
                    ) -> tuple[SettingResult, dict[str, torch.Tensor]]:
    """Thresholds and rates of one (layer, k) under ``budgets``; with ``keep`` also the raw
    distributions (for the report's plot)."""
    d, n = acts.d, acts.ctx.shape[0]
    masks, exact, span = acts.ctx[:, :k], acts.bare[:, :k], acts.span[:, :k]
    pos = own_overlap(acts.para[:, :k], masks, acts.para_owner) if acts.para.shape[0] else torch.zeros(0)
    bare_pos = own_overlap(acts.bare[:, :k], masks, torch.arange(n))
    g_best, g_arg = best_overlap(acts.general[:, :k], masks, d)
    nb_best, _ = best_overlap(acts.neigh[:, :k], masks, d)
    # per neighbourhood prompt: its most-overlapping token
    m_prompts = int(acts.neigh_prompt.max()) + 1 if acts.neigh_prompt.numel() else 0
    nb_prompt = torch.zeros(m_prompts, dtype=torch.float64).scatter_reduce(
        0, acts.neigh_prompt, nb_best.double(), reduce="amax", include_self=True) if m_prompts else torch.zeros(0)
    sep = separation(pos, g_best, budgets.general(n), k)
    t_n = lowest_threshold_for_rate(nb_prompt, budgets.neighbour, k)
    thr = max(sep.threshold, t_n)
    recall = share_at_or_above(pos, thr)
    # exact keys: strict enough that no general or neighbourhood token reaches one
    gx, _ = best_overlap(acts.general[:, :k], exact, d)
    nx, _ = best_overlap(acts.neigh[:, :k], exact, d)
    exact_neg = torch.cat([gx, nx])
    exact_thr = min(1.0, lowest_threshold_for_rate(exact_neg, budgets.exact_general, k, floor=thr))
    # span keys: the highest threshold that keeps span_keep of the multi-token paraphrases' own reads
    para_span = own_overlap(acts.para_prev[:, :k], span, acts.para_owner) if acts.para.shape[0] else torch.zeros(0)
    sel = acts.para_multi & acts.guarded[acts.para_owner] if acts.para.shape[0] else torch.zeros(0, dtype=torch.bool)
    span_pos = para_span[sel & (pos >= thr)] if pos.numel() else torch.zeros(0)
    span_thr = highest_threshold_keeping(span_pos, budgets.span_keep, k)
    # general tokens that fire a guarded entry: does the token before them match its span key?
    fire = g_best >= thr - 1e-9
    g_prev = torch.cat([acts.general[:1, :k], acts.general[:-1, :k]]) if acts.general.shape[0] else acts.general[:, :k]
    g_span = own_overlap(g_prev, span, g_arg) if g_prev.shape[0] else torch.zeros(0)
    blocked = fire & acts.guarded[g_arg] & ~((g_span >= span_thr - 1e-9) & acts.general_has_prev) \
        if g_prev.shape[0] else torch.zeros(0, dtype=torch.bool)
    p_blocked = sel & ~(para_span >= span_thr - 1e-9) if pos.numel() else torch.zeros(0, dtype=torch.bool)
    res = SettingResult(
        layer=acts.layer, k=k, threshold=thr, recall=recall, general_fire=share_at_or_above(g_best, thr),
        neighbour_fire=share_at_or_above(nb_prompt, thr), exact_threshold=exact_thr, span_threshold=span_thr,
        recall_guarded=float(((pos >= thr - 1e-9) & ~p_blocked).double().mean()) if pos.numel() else 0.0,
        general_fire_guarded=float((fire & ~blocked).double().mean()) if fire.numel() else 0.0,
        bare_recall=share_at_or_above(bare_pos, thr), separation_general=sep,
        distributions={"paraphrase_own": quantiles(pos), "general_best": quantiles(g_best),
                       "neighbour_prompt_best": quantiles(nb_prompt), "exact_negatives_best": quantiles(exact_neg),
                       "span_paraphrase_own": quantiles(span_pos)})
    raw = {"paraphrase_own": pos, "general_best": g_best, "neighbour_prompt_best": nb_prompt,
           "exact_negatives_best": exact_neg, "span_paraphrase_own": span_pos,
           "span_general_fired": g_span[fire & acts.guarded[g_arg]] if g_span.numel() else torch.zeros(0)} \
        if keep else {}
    return res, raw


def choose_setting(results: list[SettingResult], prefer_layer: int) -> SettingResult:
    """The setting whose paraphrases read their entry most often under the budgets (with the span guard
    on); ties go to the smaller k (less state per fact), then to the layer nearest ``prefer_layer``."""
    if not results:
        raise ValueError("no fingerprint setting was measured")
    return max(results, key=lambda r: (round(r.recall_guarded, 4), -r.k, -abs(r.layer - prefer_layer)))


def general_texts(corpus: str, skip: int, docs: int) -> list[str]:
    """Documents ``[skip, skip + docs)`` of a statistics corpus: after those the background mean reads."""
    from kedit.stats.corpus import load_corpus

    return list(islice(load_corpus(corpus).texts(), skip, skip + docs))
