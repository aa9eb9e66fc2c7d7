"""What one stray read of the memory costs general text, measured on the model: the read-share rule's
inputs.

A general-text token whose fingerprint happens to overlap an entry's mask reads that entry and gets its
output change; the text after it then pays in next-token log-likelihood. How much depends on the model
(Gemma 3 270M pays about four times what SmolLM2-135M pays per read) and on the share of the change a
read adds. Here a small memory of calibration facts is written for real and each general-text window
gets one **forced read**: at the token of the window whose fingerprint overlaps some entry most (the
kind of token that misfires once the memory is large), that entry's block is applied to the token's
own activation at share ``s``, exactly as a firing read would add it. The window's summed NLL increase,
averaged over windows, is the damage of one read ``D(s)`` in nats; windows are cut as the benchmark's
perplexity cuts its reference text, so ``rate x entries x D(s)`` is the change in mean log-perplexity.

The same memory tells how low a read share may go: the share at which its facts still read as edited
(:func:`lowest_keeping_share`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kedit.calibration.fingerprints import forward_inputs
from kedit.editors import attach as _attach
from kedit.editors.base import EditorState
from kedit.editors.memoir.memory import fingerprint, memory_delta, one_hot_sets, own_block_delta
from kedit.editors.memoir.read import install_residual_change, reads_own_block
from kedit.editors.memoir.state import BG, BLOCK_U, BLOCK_V, MASKS, PERM, W
from kedit.models.scoring import forward_logits, pad_id, right_pad

FORCED = "memoir-forced-read"  # the attachment's name: apart from a live memory's


# --- pure rules ------------------------------------------------------------------------------------
def poisson_upper(events: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a Poisson mean after observing ``events``: the ``mu`` with
    ``P(X <= events | mu) = 1 - confidence`` (bisection on the CDF; 0 events at 95%: 3.00)."""
    if events < 0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need events >= 0 and 0 < confidence < 1, got {events}, {confidence}")

    def cdf(mu: float) -> float:
        term, total = math.exp(-mu), math.exp(-mu)
        for i in range(1, events + 1):
            term *= mu / i
            total += term
        return total

    lo, hi = float(events), float(events) + 10.0 + 10.0 * math.sqrt(events + 1.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) > 1.0 - confidence:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def power_law_exponent(shares: Sequence[float], damages: Sequence[float], lo: float = 1.0, hi: float = 4.0
                       ) -> float:
    """``a`` in ``D(s) = D(1) * s ** a``: the least-squares slope of ``log D`` on ``log s`` over the points
    with ``D > 0``, clipped to ``[lo, hi]`` (``hi`` when fewer than two points are positive: the damage
    is too small to resolve, and a steep curve keeps full reads longest)."""
    pts = [(math.log(s), math.log(d)) for s, d in zip(shares, damages) if d > 0 and s > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return hi
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return min(hi, max(lo, slope))


def fire_budget_from_damage(ppl_budget: float, damage_full: float) -> float:
    """The share of general-text tokens that may read at full share: a perplexity rise of ``ppl_budget``
    (0.02: +2%) is ``log(1 + ppl_budget)`` nats per token, and each read costs ``damage_full`` nats."""
    if ppl_budget <= 0:
        raise ValueError(f"ppl_budget must be positive, got {ppl_budget}")
    if damage_full <= 0:
        return 1.0  # a read costs nothing measurable: every token may read
    return math.log1p(ppl_budget) / damage_full


def lowest_keeping_share(shares: Sequence[float], scores: Sequence[float], keep: float) -> float:
    """The lowest share, walking down from the largest, before which every share keeps at least ``keep``
    of the largest share's score (``scores[i]`` measured at ``shares[i]``)."""
    if not shares or len(shares) != len(scores):
        raise ValueError("need one score per share")
    pairs = sorted(zip(shares, scores), reverse=True)
    ref = pairs[0][1]
    best = pairs[0][0]
    for s, v in pairs[1:]:
        if v < keep * ref - 1e-12:
            break
        best = s
    return best


# --- measuring on the model ---------------------------------------------------------------------------
@dataclass
class ReadDamage:
    """Forced reads on general text: the damage of one read at each share, and what it was measured on."""

    shares: list[float]
    damage: list[float]  # mean summed NLL increase of a window (nats) with one forced read, per share
    damage_sd: list[float]
    exponent: float
    windows: int
    entries: int
    overlap: dict[str, float] = field(default_factory=dict)  # the forced tokens' overlaps with their entry
    tokens: list[str] = field(default_factory=list)  # a few of the forced tokens, for the report
    seconds: float = 0.0

    @property
    def damage_full(self) -> float:
        return self.damage[self.shares.index(max(self.shares))]


def _window_inputs(lm, layer: int, windows: list[list[int]], batch: int) -> list[torch.Tensor]:
    """The memory layer's down-projection input at every token of each window (``[len, d]`` each)."""
    name = lm.adapter.mlp_out_name(layer)
    return forward_inputs(lm, [name], windows, [list(range(len(w))) for w in windows], chunk=batch)[name]


def subject_keys(lm, layer: int, requests: Sequence) -> torch.Tensor:
    """The memory layer's down-projection input at each request's subject's last token, in its bare prompt
    (``[n, d]``): what an entry's own subject presents to its block."""
    from kedit.editors.prompts import subject_rows

    rows = subject_rows(lm.tokenizer, list(requests), [""])
    inputs = _window_inputs(lm, layer, rows.ids, 8)
    return torch.stack([x[p] for x, p in zip(inputs, rows.subj_pos)])


def nearest_reads(state: EditorState, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per window: the position (not the first, which is context only, nor the last) whose fingerprint
    overlaps an entry's mask most, that entry, and the overlap."""
    k = int(state.meta["k"])
    bg, perm = state.tensors[BG], state.tensors[PERM]
    stored = one_hot_sets(state.tensors[MASKS], bg.shape[0])
    pos, ent, ov = [], [], []
    for x in inputs:
        o = fingerprint(x, bg, perm, k)
        best, entry = (one_hot_sets(o, bg.shape[0]) @ stored.T / k).max(dim=1)
        best[0] = -1.0
        best[-1] = -1.0
        p = int(best.argmax())
        pos.append(p)
        ent.append(int(entry[p]))
        ov.append(float(best[p]))
    return torch.tensor(pos), torch.tensor(ent), torch.tensor(ov)


def _forced_window_nlls(lm, state: EditorState, windows: list[list[int]], pos: torch.Tensor | None,
                        entry: torch.Tensor | None, share: float, batch: int, keys: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Summed next-token NLL of each window (the first token is context only), with the entry's block
    added at share ``share`` at ``pos[i]`` of window ``i`` (``pos`` None: no read, the model as it is),
    applied to the token's own input, or with ``keys`` (``[entries, d]``) to the entry's own subject's."""
    masks = state.tensors[MASKS].to(lm.device)
    own = reads_own_block(state)
    tensors = {key: state.tensors[key].to(lm.device) for key in ((BLOCK_U, BLOCK_V) if own else (W,))}
    rows: dict[str, torch.Tensor] = {}

    def change(x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        e = rows["entry"]
        cols = masks[e]
        src = flat[rows["flat"]] if keys is None else keys.to(flat.device, flat.dtype)[e]
        if own:
            delta = own_block_delta(src, cols, tensors[BLOCK_U][e], tensors[BLOCK_V][e])
        else:
            delta = memory_delta(src, cols, tensors[W])
        return rows["flat"], delta * share

    pad = pad_id(lm.tokenizer)
    out = torch.zeros(len(windows), dtype=torch.float64)
    att = install_residual_change(lm, FORCED, int(state.meta["layer"]), change) if pos is not None else None
    try:
        for i in range(0, len(windows), batch):
            chunk = windows[i: i + batch]
            ids, mask, ppos = right_pad(chunk, pad, lm.device)
            if att is not None:
                t = ids.shape[1]
                sel = torch.arange(i, i + len(chunk))
                rows["flat"] = (torch.arange(len(chunk)) * t + pos[sel]).to(lm.device)
                rows["entry"] = entry[sel].to(lm.device)
            with torch.no_grad():
                logits = forward_logits(lm, ids, mask, ppos)
                for j, w in enumerate(chunk):
                    lp = torch.log_softmax(logits[j, : len(w) - 1], dim=-1)
                    tgt = torch.tensor(w[1:], device=lp.device)
                    out[i + j] = -float(lp.gather(1, tgt[:, None]).double().sum())
                del logits
    finally:
        if att is not None:
            _attach.detach(lm.model, FORCED)
    return out


def measure_read_damage(lm, state: EditorState, windows: list[list[int]], shares: Sequence[float] = (1.0, 0.7, 0.5),
                        batch: int = 2, tick: Callable[[str, int, int], None] | None = None,
                        keys: torch.Tensor | None = None) -> ReadDamage:
    """The damage of one read at each of ``shares`` on ``windows`` (general text, cut as perplexity cuts
    it), with ``state``'s memory (not attached to ``lm``) supplying the entries. With ``keys`` (each
    entry's own subject input, :func:`subject_keys`) a forced read adds the change the entry's subject
    gets; without, the block applied to the forced token's own input (which, in a small memory, overlaps
    its entry less than a real misfire of a large one does, and so understates the damage)."""
    import time

    t0 = time.perf_counter()
    windows = [w for w in windows if len(w) >= 3]
    if not windows:
        raise ValueError("read damage: no general-text window of 3 tokens or more")
    inputs = _window_inputs(lm, int(state.meta["layer"]), windows, batch)
    pos, entry, ov = nearest_reads(state, inputs)
    del inputs
    clean = _forced_window_nlls(lm, state, windows, None, None, 1.0, batch)
    damage, sd = [], []
    for n, s in enumerate(shares):
        forced = _forced_window_nlls(lm, state, windows, pos, entry, float(s), batch, keys)
        d = forced - clean
        damage.append(round(float(d.mean()), 4))
        sd.append(round(float(d.std()) if d.numel() > 1 else 0.0, 4))
        if tick:
            tick("read damage", n + 1, len(shares))
    q = torch.quantile(ov.double(), torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
    toks = [lm.tokenizer.decode([windows[i][int(pos[i])]]) for i in range(min(8, len(windows)))]
    return ReadDamage(shares=[float(s) for s in shares], damage=damage, damage_sd=sd,
                      exponent=round(power_law_exponent(shares, damage), 3), windows=len(windows),
                      entries=int(state.tensors[MASKS].shape[0]),
                      overlap={"median": round(q[0], 4), "q0.9": round(q[1], 4), "max": round(float(ov.max()), 4)},
                      tokens=toks, seconds=round(time.perf_counter() - t0, 1))
