"""The lifelong editing benchmark: T CounterFact records applied in batches of B to one model,
every METRICS.md metric measured on all T records after the last batch (and on the records edited
so far every K batches, for the curve), against the unedited baseline.

Seconds per edit count only the editing calls (v*, keys, solves, applying the deltas); statistics,
projectors, prefixes and evaluation are reported separately.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.atomic import write_json_atomic, write_text_atomic
from kedit.bench.console import ProgressLog, device_str
from kedit.editors.base import apply_deltas
from kedit.editors.hparams import load_hparams
from kedit.editors.io import request_from_record
from kedit.evaluation.metrics import wilson_interval
from kedit.stats import DEFAULT_STATS_TOKENS

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "counterfact-dev.json"


@dataclass
class LifelongConfig:
    method: str = "alphaedit"
    data: str = str(DEFAULT_DATA)
    edits: int = 100
    batch: int = 10
    offset: int = 0  # first record used
    eval_every: int = 0  # batches between curve points (0: about 10 points)
    fluency_prompts: int | None = 100  # first N edit prompts for fluency and greedy entropy (None: all T;
    # sampling 100 tokens for each of 10,000 prompts would dwarf the editing time on a CPU)
    fluency_tokens: int = 100  # new tokens generated per fluency prompt (METRICS.md: 100)
    ppl_tokens: int = 10_000  # held-out reference tokens for perplexity
    stats_corpus: str = "wiki-summaries-en"
    stats_tokens: int = DEFAULT_STATS_TOKENS
    hparams_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def load_counterfact(path: str | Path, n: int, offset: int = 0) -> list[dict]:
    from kedit.evaluation.metrics import check_counterfact

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CounterFact file {path} not found (pass --data)")
    data = json.loads(path.read_text())
    recs = data[offset: offset + n]
    if len(recs) < n:
        raise ValueError(f"{path}: asked for {n} records from offset {offset}, only {len(recs)} available")
    check_counterfact(recs, str(path))
    return recs


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _model_metrics(lm, records: list[dict], fluency_prompts: list[str], ref_text: str, ppl_tokens: int,
                   loc_before: torch.Tensor | None, fluency_tokens: int = 100) -> tuple[dict, torch.Tensor]:
    from kedit.evaluation import metrics as M

    cf = M.evaluate_counterfact(lm, records)
    loc = M.next_token_logprobs(lm, [r["locality_prompt"] for r in records])
    out = {k: cf[k] for k in ("efficacy", "generalization", "specificity", "efficacy_magnitude", "score")}
    # fluency is METRICS.md's GE (top-k 5 sampling from a fixed seed); greedy_entropy the same n-gram
    # entropy of greedy continuations of the same prompts, which sampling noise cannot mask
    out["fluency"] = M.generation_entropy(lm, fluency_prompts, max_new_tokens=fluency_tokens)
    out["greedy_entropy"] = M.greedy_entropy(lm, fluency_prompts, max_new_tokens=fluency_tokens)
    out["fluency_setup"] = {"prompts": len(fluency_prompts), "new_tokens": fluency_tokens,
                            "top_k": M.FLUENCY_TOP_K, "seed": M.FLUENCY_SEED}
    out["perplexity"] = M.perplexity(lm, ref_text, max_tokens=ppl_tokens)
    out["nkl"] = 0.0 if loc_before is None else M.neighbourhood_kl(loc_before, loc)
    out["failed_ids"] = cf["failed_ids"]
    return out, loc


def run_lifelong(lm, ws, cfg: LifelongConfig, progress: bool = True, edit_out: str | Path | None = None) -> dict:
    """Run the benchmark on ``lm`` (edited in memory) and return the results dictionary.

    ``edit_out``: also write the sum of all batches' deltas and the final editor state there as a
    `kedit edit` directory, so the edited model can be inspected (``kedit predict --edits``),
    analysed, or edited further (``--state``) without repeating the run."""
    from kedit.editors.common import as_key_stats, projector
    from kedit.editors.context import context_prefixes
    from kedit.editors.registry import get_editor
    from kedit.evaluation.metrics import evaluate_counterfact, perplexity
    from kedit.stats.collect import ensure_stats
    from kedit.stats.corpus import heldout_text

    if cfg.edits <= 0 or cfg.batch <= 0:
        raise ValueError("edits and batch must be positive")
    records = load_counterfact(cfg.data, cfg.edits, cfg.offset)
    requests = [request_from_record(r, f"{cfg.data} record {cfg.offset + i}") for i, r in enumerate(records)]
    hp = load_hparams(cfg.method, lm, cfg.hparams_file, cfg.overrides)
    layers = hp.resolve_layers(lm.adapter.num_layers)
    n_batches = math.ceil(cfg.edits / cfg.batch)
    eval_every = cfg.eval_every or max(1, n_batches // 10)
    fluency_prompts = [r["prompt"] for r in records[: cfg.fluency_prompts]]
    ref_text = heldout_text()
    log = ProgressLog(progress)

    t = time.perf_counter()
    baseline, loc_before = _model_metrics(lm, records, fluency_prompts, ref_text, cfg.ppl_tokens, None, cfg.fluency_tokens)
    eval_seconds = time.perf_counter() - t
    log(f"baseline: {_fmt_row(baseline)} ({eval_seconds:.0f}s)")

    t = time.perf_counter()
    stats = ensure_stats(lm, layers, ws, cfg.stats_corpus, max_tokens=cfg.stats_tokens, progress=progress)
    prefixes = context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, ws.cache_dir)
    nullspace = {}
    if cfg.method == "alphaedit":
        ks = as_key_stats(stats, layers, lm.adapter.key_dim())
        for i in layers:
            nullspace[i] = projector(ks, i, lm.manifest.model_hash, hp.nullspace_threshold, hp.nullspace_mode)[1]
    one_time = time.perf_counter() - t
    log(f"one-time work {one_time:.1f}s (stats {stats.n_tokens} tokens, {len(prefixes) - 1} prefixes"
        + (f", null-space dims {nullspace}" if nullspace else "") + ")")

    editor = get_editor(cfg.method, hp, cache_dir=ws.cache_dir)
    state = None
    edit_seconds = 0.0
    curve: list[dict] = []
    diags: list[dict] = []
    layer_infos: list[dict] = []
    total: dict[str, torch.Tensor] = {}
    for b in range(n_batches):
        batch = requests[b * cfg.batch: (b + 1) * cfg.batch]
        t = time.perf_counter()
        res = editor.compute(lm, batch, state, stats)
        apply_deltas(lm.model, res.deltas)
        dt = time.perf_counter() - t
        edit_seconds += dt
        state = res.state
        if edit_out is not None:
            for name, d in res.deltas.items():
                total[name] = d.clone() if name not in total else total[name] + d
        diags += [asdict(d) for d in res.diagnostics]
        layer_infos.append(res.layer_info)
        done = min(cfg.edits, (b + 1) * cfg.batch)
        met = sum(d.constraint_met for d in res.diagnostics)
        log(f"batch {b + 1}/{n_batches}: {dt:.1f}s ({dt / len(batch):.2f} s/edit), v* met {met}/{len(batch)}, "
            f"z residual {res.layer_info.get('z', {}).get('relative_residual_after', float('nan')):.3f}"
            + (f", norm anchor skipped {sum(d.norm_anchor_skipped for d in res.diagnostics)}"
               if "norm_anchor" in res.layer_info else ""))
        if (b + 1) % eval_every == 0 or b == n_batches - 1:
            t = time.perf_counter()
            cf = evaluate_counterfact(lm, records[:done])
            point = {"edits": done, **{k: cf[k] for k in ("efficacy", "generalization", "specificity")}}
            if b < n_batches - 1:  # the last point takes the final evaluation's perplexity
                point["perplexity"] = perplexity(lm, ref_text, max_tokens=cfg.ppl_tokens)
            eval_seconds += time.perf_counter() - t
            curve.append(point)

    t = time.perf_counter()
    edited, _ = _model_metrics(lm, records, fluency_prompts, ref_text, cfg.ppl_tokens, loc_before,
                               cfg.fluency_tokens)
    eval_seconds += time.perf_counter() - t
    curve[-1]["perplexity"] = edited["perplexity"]
    edited["seconds_per_edit"] = edit_seconds / cfg.edits
    edited["edit_seconds"] = edit_seconds
    edited["one_time_seconds"] = one_time
    edited["peak_memory_mb"] = peak_memory_mb(lm.device)
    edited["device"] = device_str(lm.device)
    baseline.update(seconds_per_edit=None, one_time_seconds=None, peak_memory_mb=None, device=edited["device"])
    log(f"edited:   {_fmt_row(edited)}  {edited['seconds_per_edit']:.2f} s/edit")
    if edit_out is not None:
        from kedit.editors.base import EditResult
        from kedit.editors.io import save_edit

        save_edit(edit_out, EditResult(deltas=total, state=state, diagnostics=[], seconds=edit_seconds),
                  {"benchmark": asdict(cfg), "requests": [r.to_dict() for r in requests]})
        log(f"edit ({len(requests)} requests, {n_batches} batches) -> {edit_out}")
    return {
        "config": {**asdict(cfg), "model": lm.slug, "model_hash": lm.manifest.model_hash, "layers": layers,
                   "hparams": hp.to_dict(), "threads": torch.get_num_threads(),
                   "stats": {"dir": str(stats.dir), "key": stats.key, "n_tokens": stats.n_tokens},
                   "prefixes": prefixes, "nullspace_dim": nullspace, "eval_seconds": eval_seconds,
                   "load_average": _loadavg()},
        "baseline": baseline,
        "edited": edited,
        "curve": curve,
        "diagnostics": diags,
        "layer_info": layer_infos,
    }


def _loadavg() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _fmt_row(m: dict) -> str:
    return (f"ES {m['efficacy']:.3f} PS {m['generalization']:.3f} NS {m['specificity']:.3f} "
            f"GE {m['fluency']:.1f} greedy GE {m['greedy_entropy']:.1f} PPL {m['perplexity']:.2f} NKL {m['nkl']:.4f}")


def results_markdown(res: dict) -> str:
    c, b, e = res["config"], res["baseline"], res["edited"]
    fs = b["fluency_setup"]

    def rel(key: str) -> str:
        return f"{100 * (e[key] - b[key]) / b[key]:+.1f}%" if b[key] else "–"

    lines = [
        f"# Lifelong editing: {c['method']} on {c['model']}",
        "",
        f"{c['edits']} CounterFact records from `{Path(c['data']).name}` (offset {c['offset']}), batches of "
        f"{c['batch']}, all metrics after the last batch. Layers {c['layers']}; device {e['device']}; "
        f"load average at the end {c['load_average']}.",
        "",
        "| run | efficacy | generalization | specificity | fluency (x100) | greedy entropy (x100) | perplexity "
        "| NKL | s/edit |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| unedited | {b['efficacy']:.3f} | {b['generalization']:.3f} | {b['specificity']:.3f} | "
        f"{b['fluency']:.1f} | {b['greedy_entropy']:.1f} | {b['perplexity']:.2f} | – | – |",
        f"| {c['method']} T{c['edits']} B{c['batch']} | {e['efficacy']:.3f} | {e['generalization']:.3f} | "
        f"{e['specificity']:.3f} | {e['fluency']:.1f} ({rel('fluency')}) | {e['greedy_entropy']:.1f} "
        f"({rel('greedy_entropy')}) | {e['perplexity']:.2f} ({rel('perplexity')}) | {e['nkl']:.4f} | "
        f"{e['seconds_per_edit']:.2f} |",
        "",
        f"- editing time {e['edit_seconds']:.1f} s ({e['seconds_per_edit']:.2f} s/edit); one-time work "
        f"(statistics, prefixes, projectors; near 0 when cached by an earlier run) {e['one_time_seconds']:.1f} s; "
        f"evaluation {c['eval_seconds']:.0f} s",
        f"- 95% intervals over the {c['edits']} records (Wilson): " + ", ".join(
            f"{k} [{lo:.2f}, {hi:.2f}]" for k in ("efficacy", "generalization", "specificity")
            for lo, hi in [wilson_interval(round(e[k] * c["edits"]), c["edits"])]),
        f"- peak memory {e['peak_memory_mb']:.0f} MB",
        f"- fluency (METRICS.md generation entropy): {fs['new_tokens']} new tokens after each of the first "
        f"{fs['prompts']} edit prompts (`prompt`), top-k sampling with k={fs['top_k']} from seed {fs['seed']}, "
        f"all prompts in one batch; n-gram entropy of the generated text only (word and punctuation tokens, "
        f"2-/3-grams weighted 2/3 and 4/3, log2), mean over prompts, x100",
        f"- greedy entropy: the same n-gram entropy on greedy {fs['new_tokens']}-token continuations of the "
        f"same prompts (sampling noise does not mask repetition there)",
        f"- perplexity on {c['ppl_tokens']} held-out tokens; statistics {c['stats']['n_tokens']} tokens",
    ]
    if c.get("nullspace_dim"):
        lines.append(f"- null-space dimension per layer: {c['nullspace_dim']}")
    infos = res.get("layer_info") or []
    z_miss = [i["z"]["relative_residual_after"] for i in infos if "z" in i]
    if z_miss:
        lines.append(f"- share of the wanted output change not written (prefix-averaged): mean "
                     f"{sum(z_miss) / len(z_miss):.3f} over batches")
    ctx_miss = [i["contexts"]["worst_relative_residual_after"] for i in infos if "contexts" in i]
    if ctx_miss:
        lines.append(f"- key mode `contexts`: worst per-context share not written {max(ctx_miss):.3f}")
    met = sum(d["constraint_met"] for d in res["diagnostics"])
    lines.append(f"- v* early-stop constraint met for {met}/{len(res['diagnostics'])} requests; mean steps "
                 f"{sum(d['vstar_steps'] for d in res['diagnostics']) / max(1, len(res['diagnostics'])):.1f}")
    lines += ["", "## Curve (records edited so far; perplexity of the held-out text)", "",
              "| edits | efficacy | generalization | specificity | perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {p['edits']} | {p['efficacy']:.3f} | {p['generalization']:.3f} | {p['specificity']:.3f} | "
              + (f"{p['perplexity']:.2f} |" if "perplexity" in p else "– |") for p in res["curve"]]
    return "\n".join(lines) + "\n"


def plot_curve(res: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["edits"] for p in res["curve"]]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, colour in (("efficacy", "tab:blue"), ("generalization", "tab:green"), ("specificity", "tab:red")):
        ax.plot(xs, [p[key] for p in res["curve"]], marker="o", color=colour, label=key)
        ax.axhline(res["baseline"][key], color=colour, ls=":", lw=1)
    c = res["config"]
    ax.set(xlabel="edits applied", ylabel="fraction of records edited so far", ylim=(0, 1.02),
           title=f"{c['method']} on {c['model']}, batches of {c['batch']} (dotted: unedited)")
    handles, labels = ax.get_legend_handles_labels()
    ppl = [(p["edits"], p["perplexity"]) for p in res["curve"] if "perplexity" in p]
    if ppl:  # damage to general text on its own axis: % over the unedited model's perplexity
        base = res["baseline"]["perplexity"]
        ax2 = ax.twinx()
        line, = ax2.plot([x for x, _ in ppl], [100 * (y / base - 1) for _, y in ppl], marker="s", color="tab:gray",
                         ls="--", label="perplexity (right)")
        ax2.set_ylabel("perplexity increase over unedited (%)")
        ax2.set_ylim(bottom=min(0.0, *(100 * (y / base - 1) for _, y in ppl)))
        handles.append(line), labels.append(line.get_label())
    ax.legend(handles, labels, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(res: dict, out_dir: str | Path, markdown, plot, plot_name: str) -> Path:
    """``results.json``, ``results.md`` (``markdown(res)``) and a plot (``plot(res, path)``) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", res)
    write_text_atomic(out / "results.md", markdown(res))
    plot(res, out / plot_name)
    return out


def write_results(res: dict, out_dir: str | Path) -> Path:
    return write_report(res, out_dir, results_markdown, plot_curve, "curve.png")
