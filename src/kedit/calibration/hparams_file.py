"""A calibration written as a model's hparams file: the calibrated values with a ``why`` note each
(the measurement behind it), the methods calibration does not derive carried from a named file and
marked so, and a ``calibration`` block recording the split, the records each stage read, the rule
parameters and the command, so the file says how it came about and the benchmark can check its
records against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kedit.calibration.run import DEFAULTS_KEYS, CalibrationResult

CARRIED_METHODS = ("rome", "memit", "alphaedit", "tpatcher")
# defaults the calibration sets; the rest of a carried file's defaults block stays as it was
CALIBRATED_DEFAULTS = DEFAULTS_KEYS


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%"


def why_notes(res: CalibrationResult) -> tuple[dict[str, str], dict[str, str]]:
    """The ``why`` of each calibrated value (defaults block, memoir block): the numbers it came from."""
    s, cfg, b = res.setting, res.config, res.config["budgets"]
    rec = res.records
    tr = res.trace
    others = sorted(((r.recall_guarded, r.layer, r.k) for r in res.settings if (r.layer, r.k) != (s.layer, s.k)),
                    reverse=True)[:3]
    layers_why = (f"causal tracing over {tr.get('n')} known calibration facts ({tr.get('samples')} noise samples, "
                  f"window {tr.get('window')}): one layer restored at a time: the block of {tr.get('block_size')} layers (not the first or last) with the largest mean "
                  f"MLP indirect effect at the last subject token; the effect peaks at layer {tr.get('peak_layer')}"
                  if "given" not in tr else f"given on the command line ({tr['given']}), not traced")
    defaults = {"layers": layers_why}
    memoir = {
        "v_lr": (f"v* probe on calibration records {rec['vstar_probe']} at layer {s.layer}: "
                 + "; ".join(f"lr {r.lr:g}: {sum(r.converged)}/{len(r.converged)} reached NLL "
                             f"{cfg['v_stop_nll']} in {r.mean_steps:.1f} steps on average" for r in res.probe_runs)
                 + "; the fewest steps with >= 90% converged wins"),
        "v_steps": f"the slowest converged probe request at lr {res.v_lr:g}, x1.5 head-room (at least 10)",
        "mm_layer": (f"of the edit layers, the one whose subject fingerprints separate best: at k {s.k} "
                     f"{s.recall_guarded:.3f} of the calibration paraphrases read their own entry (span guard on) "
                     f"with {len(range(*rec['fingerprints']))} entries stored; next best: "
                     + ", ".join(f"layer {ly} k {k} {r:.3f}" for r, ly, k in others)),
        "mm_k": "the k of that best (layer, k); ties go to the smaller k (less state per fact)",
        "mm_threshold": (f"the lowest overlap at which general text fires on at most {_pct(b['general_per_1000'])} "
                         f"of its tokens per 1,000 entries and at most {_pct(b['neighbour'])} of neighbourhood "
                         f"prompts read an entry: general text {_pct(s.general_fire)}, neighbourhood prompts "
                         f"{_pct(s.neighbour_fire)}, paraphrases {s.recall:.3f}, bare prompts {s.bare_recall:.3f} "
                         f"(through the mask alone)"),
        "mm_exact_threshold": (f"the lowest overlap (not below mm_threshold) at which no general-text or "
                               f"neighbourhood token reaches an exact key (their best: "
                               f"{s.distributions['exact_negatives_best'].get('max', 0):.3f})"),
        "mm_span_threshold": (f"the highest that keeps {b['span_keep']:.0%} of the multi-token paraphrases' own "
                              f"reads; with it general text fires on {_pct(s.general_fire_guarded)} of its tokens "
                              f"(without: {_pct(s.general_fire)})"),
        "mm_warm_start": (f"{res.repeat_share:.0%} of the calibration facts name an object an earlier one named "
                          f"(on when at least {cfg['warm_start_min_repeat']:.0%})"),
        "mm_read_scale_by_entries": read_share_why(res),
        "v_stop_nll": "the stop memoir ships: a batch's slow tail ends at 0.1 (rule, not fitted)",
        "v_dtype": "auto: bfloat16 where the device has bfloat16 matrix units, else float32 (rule)",
        "mm_exact_read_scale": ("null: exact reads take the mask reads' share (rule): no general-text token reaches "
                                f"an exact key at {len(range(*rec['fingerprints']))} entries, but a larger memory "
                                "has more exact keys to reach (Gemma 3 270M at 1,000 entries: 8 of its 11 stray "
                                "reads in 10,000 held-out tokens came through exact keys)"),
    }
    return defaults, memoir


def read_share_why(res: CalibrationResult) -> str:
    """The read-share schedule's ``why``: the firing rate, the damage of a read and the floor it came from."""
    cfg, rd = res.config, res.read
    if rd is None:
        return f"per-entry firing rate on general text {res.fire_rate:.3g}"
    d = rd.damage
    fl = rd.floor_scores
    return (f"general text read the {len(range(*res.records['fingerprints']))}-entry memory {rd.fire_events} times "
            f"in {rd.general_tokens} tokens (span guard on): per token per entry {rd.fire_rate_point:.3g}, "
            f"{cfg['rate_confidence']:.0%} upper bound {res.fire_rate:.3g}; a forced read of a {d.entries}-fact "
            f"memory at the token of each of {d.windows} general-text windows that overlaps it most costs the window "
            f"{d.damage_full:.2f} nats at full share, "
            + ", ".join(f"{x:.2f} at {s:g}" for s, x in zip(d.shares[1:], d.damage[1:]))
            + f" (damage ~ share ** {d.exponent:g}); a +{100 * cfg['ppl_budget']:g}% perplexity budget lets "
            f"{_pct(rd.fire_budget)} of tokens read at full share, so full reads up to entries x rate = that, then "
            f"(n0 / n) ** (1 / {d.exponent:g}), not below {rd.floor:g}: the lowest share at which the first "
            f"{min(cfg['floor_facts'], d.entries)} of those facts keep {cfg['floor_keep']:.0%} of their efficacy + "
            f"generalization (at shares {fl['shares']}: efficacy "
            f"{fl['efficacy']}, generalization {fl['generalization']})")


def build_document(res: CalibrationResult, carried: dict[str, Any] | None, carried_from: str, command: str,
                   report: str | None = None) -> dict[str, Any]:
    """The hparams file's content: ``calibration``, ``defaults`` and one block per method."""
    hp = res.hparams()
    d_why, m_why = why_notes(res)
    carried = carried or {}
    base_defaults = {k: v for k, v in (carried.get("defaults") or {}).items()
                     if k not in CALIBRATED_DEFAULTS and k != "why"}
    carried_why = {k: v for k, v in ((carried.get("defaults") or {}).get("why") or {}).items()
                   if k not in CALIBRATED_DEFAULTS}
    defaults = {**hp["defaults"], **base_defaults,
                "why": {**d_why, **{k: f"carried from {carried_from}: {v}" for k, v in carried_why.items()}}}
    doc: dict[str, Any] = {
        "calibration": {"command": command, "date": res.date, "machine": res.machine, "model": res.model,
                        "model_hash": res.model_hash, "split": res.split.to_dict(), "records": res.records,
                        "seconds": res.seconds, "rules": {k: res.config[k] for k in (
                            "budgets", "ppl_budget", "rate_confidence", "damage_facts", "damage_shares",
                            "damage_batch", "floor_shares", "floor_keep", "floor_facts",
                            "warm_start_min_repeat", "k_candidates", "probe_lrs", "probe_cap", "general_tokens",
                            "corpus", "bg_docs")},
                        "trace": res.trace, "chosen": res.setting.summary(),
                        "measured": [r.summary() for r in res.settings],
                        "probe": [{"lr": r.lr, "steps": r.steps, "converged": r.converged,
                                   "seconds": round(r.seconds, 2)} for r in res.probe_runs],
                        **({"read_shares": res.read_summary()} if res.read is not None else {}),
                        **({"report": report} if report else {}),
                        "carried": f"rome, memit, alphaedit and tpatcher blocks carried from {carried_from} "
                                   "(not calibrated)"},
        "defaults": defaults,
    }
    for method in CARRIED_METHODS:
        block = dict(carried.get(method) or {})
        if block:
            why = dict(block.pop("why", None) or {})
            why["_carried"] = f"not calibrated: this block is {carried_from}'s"
            block["why"] = why
        doc[method] = block
    doc["memoir"] = {**hp["memoir"], "why": m_why}
    return doc


def render(doc: dict[str, Any], res: CalibrationResult) -> str:
    head = (f"# {res.model}: editing settings from `kedit calibrate` ({res.date}, {res.machine}).\n"
            f"# Calibrated on records [{res.split.cal_start}, {res.split.cal_end}) of {res.split.data}; the\n"
            f"# benchmark reports on [0, {res.split.heldout_end}). Regenerate with the command in calibration.command;\n"
            f"# hand edits are lost then. Each value's `why` gives the measurement it came from.\n")
    return head + yaml.safe_dump(_plain(doc), sort_keys=False, width=120, allow_unicode=True)


def _plain(x: Any) -> Any:
    """Plain YAML types (tuples -> lists, floats rounded for reading: 6 decimals, or 4 significant digits
    below 1e-3, where 6 decimals would round a per-token rate like 3.3e-7 to 0)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return float(f"{x:.4g}") if 0.0 < abs(x) < 1e-3 else round(x, 6)
    return x


def carried_blocks(path: Path | None) -> dict[str, Any]:
    """The blocks of an existing hparams file (``{}`` when there is none)."""
    if path is None or not Path(path).is_file():
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'defaults' and per-method blocks")
    return data


def write_hparams(path: str | Path, res: CalibrationResult, carried_from: str | Path | None, command: str,
                  report: str | None = None) -> Path:
    """Write the calibrated file atomically, after checking it loads back for every method."""
    from kedit.atomic import write_text_atomic
    from kedit.editors.hparams import METHODS, load_hparams

    src = Path(carried_from) if carried_from else None
    doc = build_document(res, carried_blocks(src), str(src.name if src else "nothing"), command, report)
    text = render(doc, res)
    path = Path(path)
    tmp = path.with_name(path.name + ".check.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    try:
        for m in METHODS:
            load_hparams(m, path=tmp)
    finally:
        tmp.unlink(missing_ok=True)
    write_text_atomic(path, text)
    return path
