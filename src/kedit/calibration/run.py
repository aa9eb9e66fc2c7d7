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
4. **read shares**: how often general text reads the memory (an upper bound on the measured per-entry
   rate), what one stray read costs it at each share (forced reads of a real memory of calibration facts,
   :mod:`kedit.calibration.read_damage`) and the lowest share that keeps those facts edited: full reads
   while the expected perplexity cost stays within its budget, softer past that
   (:func:`kedit.calibration.thresholds.read_share_schedule`);
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
from kedit.calibration.read_damage import (
    ReadDamage,
    fire_budget_from_damage,
    lowest_keeping_share,
    measure_read_damage,
    poisson_upper,
)
from kedit.calibration.split import DevSplit, dev_split
from kedit.calibration.thresholds import per_entry_fire_rate, read_share_schedule
from kedit.calibration.vstar_probe import ProbeRun, choose_lr, probe
from kedit.editors.base import EditRequest
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
    ppl_budget: float = 0.02  # perplexity rise the memory's stray reads may cost general text (+2%)
    rate_confidence: float = 0.95  # the firing rate used is this one-sided Poisson upper bound
    # calibration facts written into the memory whose forced reads are measured (None: all `records`, the
    # memory the firing rate is measured on: a larger memory's stray reads match their entry more closely
    # and cost more, so damage and rate are measured at the same size)
    damage_facts: int | None = None
    damage_batch: int = 50  # ... written in batches of this many
    damage_shares: tuple = (1.0, 0.7, 0.5)
    floor_shares: tuple = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # read shares tried for the lowest that keeps edits
    floor_keep: float = 0.97  # ... keeping this share of the full-share efficacy + generalization
    floor_facts: int = 100  # ... over the first this many of the written facts
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

    read: ReadShareMeasurement | None = None

    def memoir_hparams(self) -> MemoirHparams:
        """The calibrated memoir settings as memoir's settings class (which checks every value): the edit
        layers (tracing) and prompt contexts, the memory's layer, k, thresholds and read shares, and the
        v* settings probed at the memory layer."""
        return _memoir_hparams(self.layers, self.config, self.setting, self.v_lr, self.v_steps, self.warm_start,
                               self.schedule)

    def hparams(self) -> dict[str, Any]:
        """The calibrated values, as the defaults and memoir blocks of an hparams file take them: the edit
        layers (tracing) are every editor's; v* was probed at the memory layer, so its settings are memoir's."""
        hp = self.memoir_hparams().values()
        return {"defaults": {k: hp[k] for k in DEFAULTS_KEYS}, "memoir": {k: hp[k] for k in MEMOIR_KEYS}}

    def read_summary(self) -> dict[str, Any]:
        """The read-share measurements, as the hparams file and the report keep them."""
        rd = self.read
        if rd is None:
            return {}
        d = rd.damage
        return {"fire_events": rd.fire_events, "general_tokens": rd.general_tokens,
                "fire_rate_point": float(f"{rd.fire_rate_point:.4g}"), "fire_rate_used": float(f"{self.fire_rate:.4g}"),
                "damage": {"shares": d.shares, "nats_per_read": d.damage, "sd": d.damage_sd, "exponent": d.exponent,
                           "windows": d.windows, "entries": d.entries, "overlap": d.overlap,
                           "seconds": d.seconds},
                "fire_budget": float(f"{rd.fire_budget:.4g}"), "floor": rd.floor, "floor_scores": rd.floor_scores}

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("distributions", "setting", "settings",
                                                                 "probe_runs", "split", "read")}
        d["read_shares"] = self.read_summary()
        d["split"] = self.split.to_dict()
        d["setting"] = self.setting.summary()
        d["settings"] = [r.summary() for r in self.settings]
        d["probe"] = [{"lr": r.lr, "steps": r.steps, "converged": r.converged, "seconds": round(r.seconds, 2)}
                      for r in self.probe_runs]
        return d


@dataclass
class ReadShares:
    """What a real memory of the calibration facts costs and keeps: the damage of one stray read
    (:mod:`kedit.calibration.read_damage`) and the lowest share that keeps the facts edited."""

    damage: ReadDamage
    floor: float
    floor_scores: dict[str, list[float]]


@dataclass
class ReadShareMeasurement(ReadShares):
    """What the read-share rule was derived from: :class:`ReadShares` plus how often general text reads
    (events over tokens x entries, and the upper bound used) and the share of tokens the budget lets read."""

    fire_events: int
    general_tokens: int
    fire_rate_point: float
    fire_budget: float  # share of general-text tokens that may read at full share


def _memoir_hparams(layers: list[int], cfg, s: SettingResult, v_lr: float, v_steps: int, warm: bool,
                    schedule: list | None) -> MemoirHparams:
    c = cfg if isinstance(cfg, dict) else asdict(cfg)
    return MemoirHparams(layers=list(layers), n_prefixes=c["n_prefixes"], prefix_len=c["prefix_len"],
                         v_lr=float(v_lr), v_steps=int(v_steps), v_dtype="auto", v_stop_nll=float(c["v_stop_nll"]),
                         mm_layer=s.layer, mm_k=s.k, mm_threshold=round(s.threshold, 6),
                         mm_exact_threshold=round(s.exact_threshold, 6), mm_span_key=True,
                         mm_span_threshold=round(s.span_threshold, 6), mm_warm_start=bool(warm),
                         mm_read_scale_by_entries=None if schedule is None else
                         [[int(n), float(v)] for n, v in schedule],
                         mm_exact_read_scale=None, mm_bg_docs=int(c["bg_docs"]))


def read_shares(lm, hp: MemoirHparams, requests: list[EditRequest], records: list[dict], general: list[list[int]],
                cfg: CalibrationConfig, cache_dir, tick: Tick | None = None) -> ReadShares:
    """Write ``requests`` into a memory with ``hp`` (the calibrated settings so far), measure what a forced
    read of it costs general text, and the lowest read share at which its facts still read as edited
    (efficacy + generalization on the first ``cfg.floor_facts`` of ``records``, the same facts, at each of
    ``cfg.floor_shares``)."""
    import copy

    from kedit.editors.attach import detach
    from kedit.editors.memoir import MemoirEditor
    from kedit.editors.memoir.read import attach
    from kedit.evaluation.metrics import evaluate_counterfact

    editor, state = MemoirEditor(hp, cache_dir), None
    for i in range(0, len(requests), cfg.damage_batch):  # sequential batches: v* of hundreds at once is GBs
        state = editor.compute(lm, requests[i: i + cfg.damage_batch], state).state
    damage = measure_read_damage(lm, state, general, cfg.damage_shares, tick=tick)
    es, ps = [], []
    try:
        for s in cfg.floor_shares:
            st = copy.copy(state)
            st.meta = {k: v for k, v in state.meta.items() if k not in ("read_scale_by_entries",)}
            st.meta.update(read_scale=float(s), exact_read_scale=float(s))
            attach(lm, st)
            ev = evaluate_counterfact(lm, records[: cfg.floor_facts])
            es.append(round(float(ev["efficacy"]), 4))
            ps.append(round(float(ev["generalization"]), 4))
    finally:
        detach(lm.model, "memoir")
    floor = lowest_keeping_share(list(cfg.floor_shares), [a + b for a, b in zip(es, ps)], cfg.floor_keep)
    return ReadShares(damage, floor, {"shares": [float(x) for x in cfg.floor_shares], "efficacy": es,
                                      "generalization": ps})


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

    rep = repeat_share([r.target_new for r in requests])
    warm = rep >= cfg.warm_start_min_repeat
    t = time.perf_counter()
    n_general = sum(len(w) for w in general)
    events = int(round(best.general_fire_guarded * n_general))
    rate_point = per_entry_fire_rate(best.general_fire_guarded, len(requests))
    rate = poisson_upper(events, cfg.rate_confidence) / (n_general * len(requests))
    hp_mem = _memoir_hparams(layers, cfg, best, v_lr, v_steps, warm, None)
    n_dmg = len(requests) if cfg.damage_facts is None else min(cfg.damage_facts, len(requests))
    shares = read_shares(lm, hp_mem, requests[:n_dmg], recs[:n_dmg], general, cfg, cache_dir, tick)
    budget = fire_budget_from_damage(cfg.ppl_budget, shares.damage.damage_full)
    schedule = read_share_schedule(rate, budget, shares.floor, shares.damage.exponent)
    seconds["read_shares"] = time.perf_counter() - t
    log(f"read shares: a stray read costs {shares.damage.damage_full:.2f} nats (x share^{shares.damage.exponent:g}), "
        f"{events} general-text reads -> rate <= {rate:.3g} per token per entry; floor {shares.floor:g}; "
        f"schedule {schedule}")
    seconds["total"] = time.perf_counter() - t_all
    cfg_d = asdict(cfg)
    cfg_d["probe_lrs"], cfg_d["k_candidates"] = list(cfg.probe_lrs), list(cfg.k_candidates)
    return CalibrationResult(
        model=lm.slug, model_hash=lm.manifest.model_hash, num_layers=L, split=split, config=cfg_d, layers=layers,
        trace=trace, setting=best, settings=results, probe_runs=runs, v_lr=v_lr, v_steps=v_steps, fire_rate=rate,
        schedule=schedule, repeat_share=rep, warm_start=warm,
        read=ReadShareMeasurement(**vars(shares), fire_events=events, general_tokens=n_general,
                                  fire_rate_point=rate_point, fire_budget=budget),
        records={"fingerprints": [idx[0], idx[-1] + 1],
                 "trace_candidates": [idx[0], idx[-1] + 1],
                 "vstar_probe": [idx[0], idx[0] + len(probe_reqs)],
                 "read_damage": [idx[0], idx[0] + n_dmg]},
        seconds={k: round(v, 1) for k, v in seconds.items()},
        date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, {lm.device}",
        distributions=raw)
