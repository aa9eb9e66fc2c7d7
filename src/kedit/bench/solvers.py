"""Solver sweep: one batch of CounterFact edits, v* optimised once, several solve settings compared.

v* dominates the cost of an edit (about 75%) and does not depend on how the update is solved
(null-space threshold, ridge, λ·C, key mode), so a sweep over solver settings optimises it once per
distinct v* configuration and reuses it. Each setting is written onto the unedited model, measured
(efficacy, generalization, specificity on the batch, perplexity on held-out text, the analytic
output-change share ``tr(ΔCΔᵀ)/tr(WCWᵀ)`` per layer, the share of δ left unwritten) and taken off
again, bit-exactly. It maps the efficacy / damage frontier in minutes where a lifelong run takes an
hour, and shows which knobs move along the frontier and which move it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.bench.lifelong import DEFAULT_DATA, load_counterfact, write_report
from kedit.console import ProgressLog, device_str
from kedit.editors.hparams import load_hparams
from kedit.editors.io import request_from_record
from kedit.stats import DEFAULT_STATS_TOKENS


@dataclass
class SweepConfig:
    method: str = "alphaedit"
    data: str = str(DEFAULT_DATA)
    edits: int = 100  # one batch of this many records
    offset: int = 0
    ppl_tokens: int = 10_000
    stats_corpus: str = "wiki-summaries-en"
    stats_tokens: int = DEFAULT_STATS_TOKENS
    hparams_file: str | None = None
    base: dict[str, Any] = field(default_factory=dict)  # overrides shared by every setting
    settings: list[dict[str, Any]] = field(default_factory=lambda: [{}])  # one row each


def grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``{key: [values]}`` as a list of override dicts ([{}] for no axes)."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _label(setting: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()) \
        or "file defaults"


def run_sweep(lm, ws, cfg: SweepConfig, progress: bool = True) -> dict:
    from kedit.editors.base import apply_deltas
    from kedit.editors.common import EditCaches
    from kedit.editors.linalg import output_change_share
    from kedit.editors.registry import spec
    from kedit.editors.setup import prepare_edit
    from kedit.editors.vstar import vstar_signature
    from kedit.evaluation.metrics import evaluate_counterfact, perplexity
    from kedit.stats.corpus import heldout_text

    if cfg.edits <= 0 or not cfg.settings:
        raise ValueError("a sweep needs at least one edit and one setting")
    if not spec(cfg.method).needs_statistics:
        raise ValueError(f"a solver sweep compares weight editors' solves (its output-change share reads key "
                         f"statistics); {cfg.method!r} reads none")
    records = load_counterfact(cfg.data, cfg.edits, cfg.offset)
    requests = [request_from_record(r, f"{cfg.data} record {cfg.offset + i}") for i, r in enumerate(records)]
    hps = [load_hparams(cfg.method, lm, cfg.hparams_file, {**cfg.base, **s}) for s in cfg.settings]
    ref_text = heldout_text()
    log = ProgressLog(progress)

    base_cf = evaluate_counterfact(lm, records)
    base_ppl = perplexity(lm, ref_text, max_tokens=cfg.ppl_tokens)
    log(f"unedited: ES {base_cf['efficacy']:.3f} PS {base_cf['generalization']:.3f} "
        f"NS {base_cf['specificity']:.3f} PPL {base_ppl:.3f}")
    vstars: dict[tuple, Any] = {}
    caches = EditCaches()  # one model: the settings share prefixes and null-space bases
    rows = []
    for setting, hp in zip(cfg.settings, hps):
        setup = prepare_edit(lm, cfg.method, ws, hp=hp, stats_corpus=cfg.stats_corpus, stats_tokens=cfg.stats_tokens,
                             stats_progress=progress)
        layers, stats, editor = setup.layers, setup.stats, setup.editor
        sig = vstar_signature(hp, layers[-1])
        t = time.perf_counter()
        res = editor.compute(lm, requests, None, stats, vstar=vstars.get(sig), caches=caches)
        seconds = time.perf_counter() - t
        reused = sig in vstars
        vstars[sig] = res.vstar
        names = list(res.deltas)
        params = dict(lm.model.named_parameters())
        saved = {n: params[n].detach().clone() for n in names}
        try:
            share = {}
            for i in layers:
                d = res.deltas[lm.adapter.weight_name(i)]  # stored layout; [out, in] below
                d = d.T if lm.adapter.spec.transposed else d
                share[i] = output_change_share(d, lm.adapter.weight(i).detach().cpu(), stats.mom2[i].cpu())
            apply_deltas(lm.model, res.deltas)
            cf = evaluate_counterfact(lm, records)
            ppl = perplexity(lm, ref_text, max_tokens=cfg.ppl_tokens)
        finally:  # back to the unedited weights, bit-exactly, for the next setting
            with torch.no_grad():
                for n, w in saved.items():
                    params[n].copy_(w)
        info = res.layer_info
        row = {"setting": setting, "label": _label(setting), "layers": layers,
               "efficacy": cf["efficacy"], "generalization": cf["generalization"],
               "specificity": cf["specificity"], "perplexity": ppl,
               "perplexity_increase_pct": 100 * (ppl / base_ppl - 1),
               "unwritten": info.get("z", {}).get("relative_residual_after"),
               "unwritten_contexts": info.get("contexts", {}).get("relative_residual_after"),
               "output_change_share": share,
               "nullspace_dim": {i: info.get(f"L{i}", {}).get("nullspace_dim") for i in layers},
               "solve_seconds": seconds, "vstar_reused": reused}
        if "norm_anchor" in info:  # v_norm_anchor: the anchor and the ids of the facts it skipped
            row["norm_anchor"] = info["norm_anchor"]
        rows.append(row)
        log(f"{row['label']}: ES {row['efficacy']:.3f} PS {row['generalization']:.3f} NS {row['specificity']:.3f} "
            f"PPL {row['perplexity_increase_pct']:+.2f}% unwritten {row['unwritten']:.3f} "
            f"({seconds:.0f}s{', v* reused' if reused else ''})")
    return {"config": {**asdict(cfg), "model": lm.slug, "model_hash": lm.manifest.model_hash,
                       "threads": torch.get_num_threads(), "device": device_str(lm.device)},
            "baseline": {"efficacy": base_cf["efficacy"], "generalization": base_cf["generalization"],
                         "specificity": base_cf["specificity"], "perplexity": base_ppl},
            "rows": rows}


def sweep_markdown(res: dict) -> str:
    c, b = res["config"], res["baseline"]
    lines = [
        f"# Solver sweep: {c['method']} on {c['model']}",
        "",
        f"One batch of {c['edits']} CounterFact records from `{Path(c['data']).name}` (offset {c['offset']}) "
        f"written onto the unedited model with each setting; v* optimised once per v* configuration. "
        f"Base overrides: {c['base'] or 'none'}. Device {c['device']}.",
        "",
        f"Unedited: efficacy {b['efficacy']:.3f}, generalization {b['generalization']:.3f}, "
        f"specificity {b['specificity']:.3f}, perplexity {b['perplexity']:.3f}.",
        "",
        "| # | setting | efficacy | generalization | specificity | perplexity | unwritten | output change "
        "(mean over layers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in enumerate(res["rows"], 1):
        share = list(r["output_change_share"].values())
        lines.append(f"| {n} | {r['label']} | {r['efficacy']:.3f} | {r['generalization']:.3f} | {r['specificity']:.3f} | "
                     f"{r['perplexity']:.3f} ({r['perplexity_increase_pct']:+.2f}%) | {r['unwritten']:.3f} | "
                     f"{sum(share) / len(share):.4f} |")
    lines += ["", "- unwritten: share of v*'s output change the update did not write (prefix-averaged)",
              "- output change: tr(ΔCΔᵀ)/tr(WCWᵀ), the update's mean squared output on general-text keys "
              "relative to the layer's own"]
    return "\n".join(lines) + "\n"


def plot_frontier(res: dict, path: str | Path) -> None:
    """Efficacy and generalization against the perplexity increase, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    xs = [r["perplexity_increase_pct"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter(xs, [r["efficacy"] for r in rows], color="tab:blue", label="efficacy")
    ax.scatter(xs, [r["generalization"] for r in rows], color="tab:green", marker="s", label="generalization")
    for n, (x, r) in enumerate(zip(xs, rows), 1):  # numbers as in results.md's table
        for key in ("efficacy", "generalization"):
            ax.annotate(str(n), (x, r[key]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    c = res["config"]
    ax.set(xlabel="perplexity increase on held-out text (%)", ylabel="fraction of the batch",
           title=f"{c['method']} on {c['model']}: one batch of {c['edits']} edits per setting\n"
                 "(numbers: rows of results.md)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep(res: dict, out_dir: str | Path) -> Path:
    return write_report(res, out_dir, sweep_markdown, plot_frontier, "frontier.png")
