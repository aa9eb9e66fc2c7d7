"""Norm-anchored v* (NAS, Liu et al. 2026, arXiv 2602.02543) for MEMIT and AlphaEdit.

Which norm is anchored: the norm of the *MLP output target* at the last edit layer,
``m = mlp₀ + δ`` (``mlp₀``: the MLP's output at the subject before the edit, prefix-averaged like v₀;
δ: the change v* optimised), not the norm of the whole residual stream ``v₀ + δ``. The paper's
reasoning: what the edited matrices must learn to produce is the MLP's value vector, and sequential
editing degrades when those targets drift far above the norms the MLP produces for ordinary facts;
every update then writes an outsized value and the weight norm grows edit after edit. Anchoring the
residual stream instead would rescale the untouched part of the stream (attention and earlier layers,
most of ‖v₀‖) and change the model at the subject for reasons unrelated to the fact.

The rule: each request's ``m`` is rescaled to the anchor ``a`` (the base model's mean ‖m‖ over
freshly optimised v*, upper 5% trimmed), so the applied change is ``δ' = a·m/‖m‖ − mlp₀``; a request
with ``‖m‖ > factor·a`` is not applied at all (an outlier v* is a symptom of a fact the layer cannot
hold cheaply), and is reported, never dropped silently.

The anchor is computed once per (base model hash, layer, v* settings) from the first batch edited on
the base model, and cached as JSON beside the key statistics (``<stats dir>/vstar_anchor/``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.atomic import sha256_json, write_json_atomic

log = logging.getLogger(__name__)

TRIM_UPPER_QUANTILE = 0.95  # the anchor ignores the largest 5% of norms (the outliers it guards against)

_ANCHOR_MEMO: dict[str, float] = {}


def trimmed_mean(norms: torch.Tensor, upper_quantile: float = TRIM_UPPER_QUANTILE) -> float:
    """Mean of ``norms`` after dropping the largest ``floor((1 − q)·n)`` values."""
    vals = torch.sort(norms.detach().to(torch.float64).flatten()).values
    if vals.numel() == 0:
        raise ValueError("norm anchor: no v* norms to average")
    if not bool(torch.isfinite(vals).all()):
        raise ValueError("norm anchor: non-finite v* norms")
    drop = int(math.floor((1.0 - upper_quantile) * vals.numel()))
    return float(vals[: vals.numel() - drop].mean())


@dataclass
class AnchorPlan:
    """What the anchor does to one batch: the δ to apply, which requests are kept, and why."""

    delta: torch.Tensor  # [n, d] the applied change of the layer output (0 for a skipped request)
    keep: torch.Tensor  # [n] bool
    ratio: torch.Tensor  # [n] ‖mlp₀ + δ‖ / anchor, before rescaling


def anchor_plan(mlp0: torch.Tensor, delta: torch.Tensor, anchor: float, skip_factor: float) -> AnchorPlan:
    """Rescale every ``mlp₀ + δ`` (rows) to norm ``anchor``; skip rows whose norm exceeds
    ``skip_factor · anchor``. Returns δ' with ``‖mlp₀ + δ'‖ = anchor`` for kept rows."""
    if anchor <= 0 or not math.isfinite(anchor):
        raise ValueError(f"norm anchor must be a positive finite norm, not {anchor}")
    m = mlp0.to(torch.float64) + delta.to(torch.float64)
    norm = m.norm(dim=1)
    ratio = norm / anchor
    keep = ratio <= skip_factor
    scaled = m * (anchor / norm.clamp_min(1e-12))[:, None] - mlp0.to(torch.float64)
    new = torch.where(keep[:, None], scaled, torch.zeros_like(scaled)).to(delta.dtype)
    return AnchorPlan(delta=new, keep=keep, ratio=ratio)


def anchor_key(model_hash: str, layer: int, vstar_settings: dict) -> str:
    """What the anchor depends on: the base model, the layer, and every setting v* reads."""
    return sha256_json({"model": model_hash, "layer": layer, "vstar": vstar_settings,
                        "trim": TRIM_UPPER_QUANTILE, "what": "mlp_output_target_norm"})


def anchor_path(stats_dir: Path | None, layer: int, key: str) -> Path | None:
    return Path(stats_dir) / "vstar_anchor" / f"L{layer}_{key[:16]}.json" if stats_dir else None


def cached_anchor(stats_dir: Path | None, layer: int, key: str) -> float | None:
    """The anchor from memory or ``<stats dir>/vstar_anchor/``, or None when not computed yet."""
    if key in _ANCHOR_MEMO:
        return _ANCHOR_MEMO[key]
    path = anchor_path(stats_dir, layer, key)
    if path is None or not path.exists():
        return None
    import json

    data = json.loads(path.read_text())
    if data.get("key") != key:
        raise ValueError(f"norm anchor cache {path} holds key {str(data.get('key'))[:16]}, expected {key[:16]}")
    _ANCHOR_MEMO[key] = float(data["anchor"])
    return _ANCHOR_MEMO[key]


def store_anchor(stats_dir: Path | None, layer: int, key: str, norms: torch.Tensor, request_ids: list,
                 model_hash: str) -> float:
    """Compute the anchor from base-model norms, keep it in memory and (when there is a stats dir)
    write it atomically beside the statistics with the requests it came from."""
    anchor = trimmed_mean(norms)
    _ANCHOR_MEMO[key] = anchor
    path = anchor_path(stats_dir, layer, key)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"key": key, "anchor": anchor, "layer": layer, "model_hash": model_hash,
                                     "n": int(norms.numel()), "trim_upper_quantile": TRIM_UPPER_QUANTILE,
                                     "raw_mean": float(norms.to(torch.float64).mean()),
                                     "request_ids": [str(r) for r in request_ids]})
        except OSError as exc:  # read-only stats dir: keep it in memory only
            log.warning("could not cache the v* norm anchor at %s: %s", path, exc)
    return anchor


def mlp_output_at_subject(lm, keys: torch.Tensor, layer: int) -> torch.Tensor:
    """``[n, d_out]`` float64: the edited matrix applied to prefix-averaged keys ``[d_key, n]`` (the MLP
    is linear in its last matrix, so this equals the prefix-averaged MLP output)."""
    w = lm.adapter.weight(layer).detach().to(torch.float64)
    out = (w @ keys.to(w.device, torch.float64)).T
    bias = getattr(lm.adapter.mlp_out(layer), "bias", None)
    return out + bias.detach().to(torch.float64) if bias is not None else out


def clear_memo() -> None:
    _ANCHOR_MEMO.clear()


@dataclass
class AnchoredBatch:
    """A batch after the anchor: the requests still applied, their v*, every request's diagnostics
    (skipped ones flagged) and the numbers for ``EditResult.layer_info``."""

    requests: list
    vstar: object  # VStar of the kept requests, δ rescaled
    diagnostics: list
    info: dict[str, float]


def anchor_batch(lm, requests: list, prefixes: list[str], vs, hp, layer: int, state, stats_dir: Path | None
                 ) -> AnchoredBatch:
    """Apply the norm anchor to an optimised v* (``vs``). The anchor comes from the cache, or, when
    the model is still the base model (``state`` holds no edits), from this batch's own norms; a
    missing anchor on an already-edited model is an error, since its norms are not the base model's."""
    import dataclasses

    from kedit.editors.keys import SubjectStates
    from kedit.editors.prompts import subject_rows
    from kedit.editors.vstar import VSTAR_FIELDS, VStar

    model_hash = lm.manifest.model_hash
    key = anchor_key(model_hash, layer, {f: getattr(hp, f) for f in VSTAR_FIELDS})
    keys, _ = SubjectStates(lm, subject_rows(lm.tokenizer, requests, prefixes), layer, layer).read(lm, [layer])
    mlp0 = mlp_output_at_subject(lm, keys[layer], layer)
    anchor = cached_anchor(stats_dir, layer, key)
    if anchor is None:
        n_edits = int(state.meta.get("n_edits", 0)) if state is not None else 0
        if n_edits:
            raise ValueError(f"v_norm_anchor: no cached anchor for layer {layer} (key {key[:16]}, looked in "
                             f"{anchor_path(stats_dir, layer, key)}) and the model already carries {n_edits} "
                             "edits; the anchor must come from the base model: edit a first batch on it")
        norms = (mlp0 + vs.delta.to(torch.float64).to(mlp0.device)).norm(dim=1)
        anchor = store_anchor(stats_dir, layer, key, norms, [r.id for r in requests], model_hash)
    plan = anchor_plan(mlp0, vs.delta.to(mlp0.device), anchor, hp.v_norm_skip_factor)
    keep = plan.keep.tolist()
    idx = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=vs.delta.device)
    diags = [dataclasses.replace(d, delta_norm=float(plan.delta[i].norm()), norm_anchor_skipped=not keep[i])
             for i, d in enumerate(vs.diagnostics)]
    kept = [r for r, k in zip(requests, keep) if k]
    applied = VStar(delta=plan.delta.to(vs.delta.device, vs.delta.dtype).index_select(0, idx),
                    v0=vs.v0.index_select(0, idx.to(vs.v0.device)), diagnostics=[diags[i] for i in idx.tolist()],
                    steps=vs.steps, seconds=vs.seconds, layer=vs.layer, request_ids=tuple(r.id for r in kept))
    info: dict[str, float] = {"anchor_norm": anchor, "n_skipped": float(len(requests) - len(kept)),
                              "mean_ratio": float(plan.ratio.mean()), "max_ratio": float(plan.ratio.max())}
    for r, k, ratio in zip(requests, keep, plan.ratio.tolist()):
        if not k:  # the ids of facts NOT applied, with how far above the anchor their v* was
            info[f"skipped:{r.id}"] = float(ratio)
    if len(kept) < len(requests):
        log.warning("v_norm_anchor: %d of %d requests skipped (v* norm above %.2f x anchor %.3f): %s",
                    len(requests) - len(kept), len(requests), hp.v_norm_skip_factor, anchor,
                    [r.id for r, k in zip(requests, keep) if not k])
    return AnchoredBatch(requests=kept, vstar=applied, diagnostics=diags, info=info)
