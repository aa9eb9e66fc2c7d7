"""Pure functions that turn measured distributions into settings: a threshold from the share of
negatives it lets fire, one from the share of positives it keeps, how well two distributions
separate, and the read-share rule from a measured per-entry firing rate.

Overlaps ``|M_q ∩ M_e| / k`` take only the values ``0, 1/k, ..., 1``, so thresholds are chosen on
that grid: a threshold between two grid points fires exactly as the next grid point up does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def overlap_grid(k: int) -> torch.Tensor:
    """The values an overlap at ``k`` columns can take: ``i / k`` for ``i = 0..k`` (float64)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return torch.arange(k + 1, dtype=torch.float64) / k


def share_at_or_above(values: torch.Tensor, threshold: float) -> float:
    """Share of ``values`` that reach ``threshold`` (a token fires at overlap >= threshold); 0 when empty."""
    v = values.reshape(-1).double()
    if v.numel() == 0:
        return 0.0
    return float((v >= threshold - 1e-9).double().mean())


def lowest_threshold_for_rate(negatives: torch.Tensor, rate: float, k: int, floor: float = 0.0) -> float:
    """The lowest grid threshold ``t >= floor`` (above 0) at which at most ``rate`` of ``negatives`` fire
    (``share_at_or_above(negatives, t) <= rate``); 1.0 + 1/k when even 1.0 fires too often (nothing may
    fire). Lower thresholds recall more positives, so the lowest admissible one is the choice."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    for t in overlap_grid(k).tolist()[1:]:
        if t >= floor - 1e-12 and share_at_or_above(negatives, t) <= rate + 1e-12:
            return t
    return 1.0 + 1.0 / k


def highest_threshold_keeping(positives: torch.Tensor, keep: float, k: int) -> float:
    """The highest grid threshold at which at least ``keep`` of ``positives`` still reach it (0.0 when
    there are no positives: no guard)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if positives.numel() == 0:
        return 0.0
    best = 0.0
    for t in overlap_grid(k).tolist():
        if share_at_or_above(positives, t) >= keep - 1e-12:
            best = t
    return best


@dataclass
class Separation:
    """How one fingerprint setting separates a fact's own prompts from other text."""

    threshold: float  # lowest threshold meeting the negatives' firing budget
    recall: float  # share of positives at or above it
    neg_rate: float  # share of negatives at or above it
    margin: float  # median(positives) - max(negatives): > 0 means some threshold separates perfectly


def separation(positives: torch.Tensor, negatives: torch.Tensor, rate: float, k: int, floor: float = 0.0
               ) -> Separation:
    """The threshold a firing budget ``rate`` on ``negatives`` allows, and what it keeps of ``positives``."""
    t = lowest_threshold_for_rate(negatives, rate, k, floor)
    pos, neg = positives.reshape(-1).double(), negatives.reshape(-1).double()
    margin = (float(pos.median()) if pos.numel() else 0.0) - (float(neg.max()) if neg.numel() else 0.0)
    return Separation(threshold=t, recall=share_at_or_above(pos, t), neg_rate=share_at_or_above(neg, t),
                      margin=margin)


def per_entry_fire_rate(fire_share: float, entries: int) -> float:
    """Share of general-text tokens that read the memory, per stored entry (a token reads at most one
    entry, and with few entries each adds its own readers: the share grows about linearly)."""
    if entries <= 0:
        raise ValueError(f"entries must be positive, got {entries}")
    return fire_share / entries


def read_share_schedule(fire_rate: float, budget: float, floor: float, exponent: float = 3.0,
                        points: int = 6) -> list[list]:
    """``mm_read_scale_by_entries`` from the measured per-entry firing rate.

    Mask reads stay full while the expected share of general-text tokens that read the memory
    (``entries x fire_rate``) is within ``budget``, i.e. up to ``n0 = budget / fire_rate`` entries.
    Past that the share is ``(n0 / n) ** (1 / exponent)``: with the damage general text takes growing
    as ``reads x share ** exponent``, that holds it at the budget's. It stops falling at ``floor``
    (reached at ``n0 / floor ** exponent`` entries). Returned as ``points`` schedule points, linear in
    between (:func:`kedit.editors.memoir.scheduled_share`). Nothing fired (rate 0): full reads
    throughout, ``[[0, 1.0]]``."""
    if not 0.0 < floor <= 1.0 or budget <= 0.0 or fire_rate < 0.0 or exponent <= 0.0:
        raise ValueError(f"need 0 < floor <= 1, budget > 0, fire_rate >= 0, exponent > 0 "
                         f"(got {floor}, {budget}, {fire_rate}, {exponent})")
    if fire_rate == 0.0 or floor == 1.0:
        return [[0, 1.0]]
    n0 = max(1, int(round(budget / fire_rate)))
    n_end = max(n0 + 1, int(math.ceil(n0 / floor ** exponent)))
    out: list[list] = [[n0, 1.0]]
    for i in range(1, points):
        n = int(round(n0 * (n_end / n0) ** (i / (points - 1))))  # geometric: the curve bends early
        if n <= out[-1][0]:
            continue
        out.append([n, round(max(floor, (n0 / n) ** (1.0 / exponent)), 4)])
    out[-1][1] = round(floor, 4)
    return out


def quantiles(values: torch.Tensor, qs: Sequence[float] = (0.05, 0.5, 0.95, 0.999)) -> dict[str, float]:
    """Named quantiles of a distribution (for the report); empty -> {}."""
    v = values.reshape(-1).double()
    if v.numel() == 0:
        return {}
    out = {f"q{q:g}": float(torch.quantile(v, q)) for q in qs}
    out["max"] = float(v.max())
    out["n"] = int(v.numel())
    return out
