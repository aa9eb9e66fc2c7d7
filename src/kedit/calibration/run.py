"""One calibration of a model's editing settings, measured on that model in minutes.

Stages (each a module of its own; the numbers each value came from go into the result):

1. **edit layers**: causal tracing over known calibration facts (:func:`kedit.tracing.aggregate`): the
   contiguous block of ``round(L / 6)`` layers (not the first or last) with the largest mean MLP
   indirect effect at the last subject token, one layer restored at a time;
2. **memory layer, k, thresholds**: subject fingerprints on every layer of that block and each
   candidate k (:mod:`kedit.calibration.fingerprints`): the read threshold is the lowest at which
   general text and neighbourhood prompts stay within their firing budgets, the exact-key threshold
   the lowest no negative reaches, the span threshold the highest that keeps 95% of the paraphrases;
   the (layer, k) whose paraphrases read their own entry most often wins;
3. **v\\***: a short convergence probe at the chosen layer (:mod:`kedit.calibration.vstar_probe`);
4. **read shares**: full reads until the measured per-entry firing rate says general text reads the
   memory at the budget's share, softer past that (:func:`kedit.calibration.thresholds.read_share_schedule`);
5. **warm start** when most calibration facts name an object an earlier one named (the start only
   exists for repeated objects).

Every stage reads only the calibration part of the development file (:mod:`kedit.calibration.split`).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kedit.calibration.fingerprints import (
    Budgets,
    SettingResult,
    background_means,
    choose_setting,
    collect,
    general_texts,
    general_token_ids,
    measure_setting,
)
from kedit.calibration.split import DevSplit, dev_split
from kedit.calibration.thresholds import per_entry_fire_rate, read_share_schedule
from kedit.calibration.vstar_probe import ProbeRun, choose_lr, probe
from kedit.editors.hparams import MemoirHparams

# the settings calibration measures, by the hparams-file block they go to
DEFAULTS_KEYS = ("layers", "n_prefixes", "prefix_len")
MEMOIR_KEYS = ("v_lr", "v_steps", "v_dtype", "v_stop_nll", "mm_layer", "mm_k", "mm_threshold", "mm_exact_threshold",
               "mm_span_key", "mm_span_threshold", "mm_warm_start", "mm_read_scale_by_entries", "mm_exact_read_scale",
               "mm_bg_docs")

Log = Callable[[str], None]
Tick = Callable[[str, int, int], None]


@dataclass
class CalibrationConfig:
    data: str
    records: int = 500  # calibration facts whose fingerprints are stored (the memory's size when measured)
    trace_facts: int = 12  # known facts traced for the edit layers
    trace_samples: int = 3
    probe_requests: int = 8  # facts in the v* probe
    probe_lrs: tuple = (0.5, 1.0, 2.0, 4.0)
    probe_cap: int = 40
    k_candidates: tuple = (32, 64, 128)
    general_tokens: int = 16_000
    general_docs: int = 400
    corpus: str = "wiki-summaries-en"
    bg_docs: int = 200  # the memory's background mean (mm_bg_docs)
    n_prefixes: int = 5
    prefix_len: int = 10
    v_stop_nll: float = 0.1
    budgets: Budgets = field(default_factory=Budgets)
    fire_budget: float = 0.0025  # share of general-text tokens the whole memory may make read at full share
    read_share_exponent: float = 3.0
    read_share_floor: float = 0.7
    warm_start_min_repeat: float = 0.5
    layers: list[int] | None = None  # given: skip the tracing stage


@dataclass
class CalibrationResult:
    model: str
    model_hash: str
    num_layers: int
    split: DevSplit
    config: dict
    layers: list[int]
    trace: dict
    setting: SettingResult
    settings: list[SettingResult]
    probe_runs: list[ProbeRun]
    v_lr: float
    v_steps: int
    fire_rate: float
    schedule: list
    repeat_share: float
    warm_start: bool
    records: dict[str, list[int]]  # which calibration records each stage read
    seconds: dict[str, float]
    date: str
    machine: str
    distributions: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def memoir_hparams(self) -> MemoirHparams:
        """The calibrated memoir settings as memoir's settings class (which checks every value): the edit
        layers (tracing) and prompt contexts, the memory's layer, k, thresholds and read shares, and the
        v* settings probed at the memory layer."""
        s = self.setting
        return MemoirHparams(layers=list(self.layers), n_prefixes=self.config["n_prefixes"],
                             prefix_len=self.config["prefix_len"], v_lr=float(self.v_lr), v_steps=int(self.v_steps),
                             v_dtype="auto", v_stop_nll=float(self.config["v_stop_nll"]), mm_layer=s.layer, mm_k=s.k,
                             mm_threshold=round(s.threshold, 6), mm_exact_threshold=round(s.exact_threshold, 6),
                             mm_span_key=True, mm_span_threshold=round(s.span_threshold, 6),
                             mm_warm_start=bool(self.warm_start),
                             mm_read_scale_by_entries=[[int(n), float(v)] for n, v in self.schedule],
                             mm_exact_read_scale=1.0, mm_bg_docs=int(self.config["bg_docs"]))

    def hparams(self) -> dict[str, Any]:
        """The calibrated values, as the defaults and memoir blocks of an hparams file take them: the edit
        layers (tracing) are every editor's; v* was probed at the memory layer, so its settings are memoir's."""
        hp = self.memoir_hparams().values()
        return {"defaults": {k: hp[k] for k in DEFAULTS_KEYS}, "memoir": {k: hp[k] for k in MEMOIR_KEYS}}

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("distributions", "setting", "settings",
                                                                 "probe_runs", "split")}
        d["split"] = self.split.to_dict()
        d["setting"] = self.setting.summary()
        d["settings"] = [r.summary() for r in self.settings]
        d["probe"] = [{"lr": r.lr, "steps": r.steps, "converged": r.converged, "seconds": round(r.seconds, 2)}
                      for r in self.probe_runs]
        return d


def repeat_share(targets: list[str]) -> float:
    """Share of facts whose new object an earlier fact already named (what a warm start can use)."""
    seen: set[str] = set()
    hits = 0
    for t in targets:
        key = t.strip()
        hits += key in seen
        seen.add(key)
    return hits / max(len(targets), 1)


def edit_block(curve: list[float], size: int) -> list[int]:
    """The contiguous ``size`` layers with the largest summed effect, leaving out layer 0 and the last
    layer when the model has more than two (first on ties)."""
    from kedit.tracing import best_block

    if len(curve) <= 2:
        return best_block(curve, size)
    return [x + 1 for x in best_block(curve[1:-1], size)]


def trace_layers(lm, facts: list[dict], n: int, samples: int, log: Log) -> tuple[list[int], dict]:
    """The edit block from causal tracing over ``n`` known calibration facts: one layer restored at a
    time (a window of layers smears the curve toward the first layers, where the windows overlap the
    embedding's work), the best block of ``round(L / 6)`` layers above layer 0 (the first MLP works
    on token identity; editors leave it alone) and below the last (the memory needs a block above it)."""
    from kedit.tracing import aggregate

    L = lm.adapter.num_layers
    block, window = max(1, round(L / 6)), 1
    flat = [{"prompt": r["prompt"].replace("{}", r["subject"]) if "{}" in r["prompt"] else r["prompt"],
             "subject": r["subject"], "ground_truth": r.get("ground_truth") or r.get("target_true") or "",
             "case_id": r.get("case_id")} for r in facts]
    flat = [r for r in flat if r["ground_truth"].strip()]
    res = aggregate(lm, flat, n=n, kinds=("mlp",), samples=samples, window=window, block_size=block,
                    progress=False)
    layers = edit_block(res.mean["mlp"], block)
    log(f"tracing: {res.n} known facts, MLP effect peaks at layer {res.peak_layer}; edit layers {layers}")
    return layers, {"n": res.n, "samples": samples, "window": window, "block_size": block,
                    "peak_layer": res.peak_layer, "mean_mlp_effect": [round(v, 5) for v in res.mean["mlp"]],
                    "case_ids": res.case_ids, "seconds": round(res.seconds, 1)}


def calibrate(lm, cfg: CalibrationConfig, cache_dir: str | Path | None = None, log: Log = lambda m: None,
              tick: Tick | None = None) -> CalibrationResult:
    """Measure ``lm`` on the calibration part of ``cfg.data`` and derive its editing settings."""
    from kedit.editors.context import context_prefixes
    from kedit.editors.hparams import EditHparams
    from kedit.editors.io import request_from_record
    from kedit.records import read_records

    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    data = read_records(cfg.data, "calibration data")
    split = dev_split(cfg.data, len(data))
    idx = split.calibration_indices(cfg.records)
    if len(idx) < 2:
        raise ValueError(f"{cfg.data}: the calibration part [{split.cal_start}, {split.cal_end}) has too few records")
    recs = [data[i] for i in idx]
    requests = [request_from_record(r, f"{Path(cfg.data).name}[{i}]") for r, i in zip(recs, idx)]
    L = lm.adapter.num_layers
    log(f"{lm.slug}: {L} layers; calibration records [{idx[0]}, {idx[-1] + 1}) of {split.data} "
        f"(held out for the benchmark: [0, {split.heldout_end}))")

    t = time.perf_counter()
    if cfg.layers:
        layers, trace = sorted(cfg.layers), {"given": sorted(cfg.layers)}
    else:
        layers, trace = trace_layers(lm, recs, cfg.trace_facts, cfg.trace_samples, log)
    seconds["trace"] = time.perf_counter() - t

    t = time.perf_counter()
    prefixes = context_prefixes(lm, cfg.n_prefixes, cfg.prefix_len, 0, cache_dir)
    texts = general_texts(cfg.corpus, 0, cfg.bg_docs + cfg.general_docs)
    if len(texts) <= cfg.bg_docs:
        raise ValueError(f"corpus {cfg.corpus}: {len(texts)} documents, need more than {cfg.bg_docs} "
                         f"(background mean) for general text")
    candidates = [x for x in layers if x < L - 1]
    bg = background_means(lm, candidates, texts[: cfg.bg_docs])
    general = general_token_ids(lm, texts[cfg.bg_docs:], cfg.general_tokens)
    d_min = min(lm.adapter.key_dim(x) for x in candidates)
    ks = sorted({k for k in cfg.k_candidates if 0 < k <= d_min // 4}) or [max(1, d_min // 8)]
    acts = collect(lm, candidates, requests, prefixes, bg, general, max(ks), tick)
    seconds["activations"] = time.perf_counter() - t
    t = time.perf_counter()
    results = []
    for layer in candidates:
        for k in ks:
            r, _ = measure_setting(acts[layer], k, cfg.budgets)
            results.append(r)
            log(f"layer {layer} k {k}: threshold {r.threshold:.3f} -> paraphrases {r.recall:.3f} "
                f"({r.recall_guarded:.3f} with span keys at {r.span_threshold:.3f}), general text fires "
                f"{100 * r.general_fire_guarded:.3f}%, neighbourhood prompts {100 * r.neighbour_fire:.1f}%, "
                f"exact keys at {r.exact_threshold:.3f}")
    best = choose_setting(results, prefer_layer=candidates[-1])
    best, raw = measure_setting(acts[best.layer], best.k, cfg.budgets, keep=True)
    del acts
    seconds["fingerprints"] = time.perf_counter() - t
    log(f"memory: layer {best.layer}, k {best.k}, threshold {best.threshold:.3f}, exact {best.exact_threshold:.3f}, "
        f"span {best.span_threshold:.3f}")

    t = time.perf_counter()
    hp = EditHparams(method="memoir", layers=layers, mm_layer=best.layer, mm_k=best.k, n_prefixes=cfg.n_prefixes,
                     prefix_len=cfg.prefix_len, v_stop_nll=cfg.v_stop_nll, v_dtype="auto")
    probe_reqs = requests[: cfg.probe_requests]
    runs = probe(lm, probe_reqs, prefixes, hp, best.layer, cfg.probe_lrs, cfg.probe_cap, log)
    v_lr, v_steps = choose_lr(runs, cap=cfg.probe_cap)
    seconds["vstar_probe"] = time.perf_counter() - t
    log(f"v*: lr {v_lr:g}, at most {v_steps} steps")

    rate = per_entry_fire_rate(best.general_fire_guarded, len(requests))
    schedule = read_share_schedule(rate, cfg.fire_budget, cfg.read_share_floor, cfg.read_share_exponent)
    rep = repeat_share([r.target_new for r in requests])
    seconds["total"] = time.perf_counter() - t_all
    cfg_d = asdict(cfg)
    cfg_d["probe_lrs"], cfg_d["k_candidates"] = list(cfg.probe_lrs), list(cfg.k_candidates)
    return CalibrationResult(
        model=lm.slug, model_hash=lm.manifest.model_hash, num_layers=L, split=split, config=cfg_d, layers=layers,
        trace=trace, setting=best, settings=results, probe_runs=runs, v_lr=v_lr, v_steps=v_steps, fire_rate=rate,
        schedule=schedule, repeat_share=rep, warm_start=rep >= cfg.warm_start_min_repeat,
        records={"fingerprints": [idx[0], idx[-1] + 1],
                 "trace_candidates": [idx[0], idx[-1] + 1],
                 "vstar_probe": [idx[0], idx[0] + len(probe_reqs)]},
        seconds={k: round(v, 1) for k, v in seconds.items()},
        date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, {lm.device}",
        distributions=raw)
