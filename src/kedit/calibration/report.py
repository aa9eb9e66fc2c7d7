"""The calibration report: a markdown page of every measurement and choice, and a PNG of the overlap
distributions with the chosen thresholds drawn on them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from kedit.atomic import write_bytes_atomic, write_text_atomic
from kedit.calibration.run import CalibrationResult


def plot_overlaps(res: CalibrationResult, path: str | Path) -> None:
    """Histograms: paraphrases vs own mask against general text / neighbourhood prompts' best overlap
    (read threshold), negatives against exact keys (exact threshold), span-key overlaps (span threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, raw = res.setting, res.distributions
    bins = torch.linspace(0, 1, s.k + 2).numpy() - 0.5 / s.k
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    def hist(ax, key, label, color):
        v = raw.get(key, torch.zeros(0)).double().numpy()
        if v.size:
            ax.hist(v, bins=bins, density=True, alpha=0.45, color=color, label=f"{label} (n={v.size})")

    hist(axes[0], "paraphrase_own", "paraphrase vs own mask", "tab:green")
    hist(axes[0], "general_best", "general-text token, best entry", "tab:gray")
    hist(axes[0], "neighbour_prompt_best", "neighbourhood prompt, best entry", "tab:red")
    axes[0].axvline(s.threshold, color="k", ls="--", label=f"mm_threshold {s.threshold:.3f}")
    axes[0].set_title(f"masks: layer {s.layer}, k {s.k}", fontsize=9)
    hist(axes[1], "exact_negatives_best", "general + neighbourhood token, best exact key", "tab:gray")
    axes[1].axvline(s.exact_threshold, color="k", ls="--", label=f"mm_exact_threshold {s.exact_threshold:.3f}")
    axes[1].set_title("exact keys", fontsize=9)
    hist(axes[2], "span_paraphrase_own", "paraphrase's previous token vs own span key", "tab:green")
    hist(axes[2], "span_general_fired", "general token that fires a guarded entry", "tab:gray")
    axes[2].axvline(s.span_threshold, color="k", ls="--", label=f"mm_span_threshold {s.span_threshold:.3f}")
    axes[2].set_title("span keys", fontsize=9)
    for ax in axes:
        ax.set_xlabel("overlap |M_q ∩ M_e| / k")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{res.model}: fingerprint overlaps on calibration records {res.records['fingerprints']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def report_markdown(res: CalibrationResult, hparams_path: str | Path, command: str) -> str:
    s, cfg = res.setting, res.config
    b = cfg["budgets"]
    lines = [f"# Calibration: {res.model}", "",
             f"`{command}` on {res.date} ({res.machine}); {res.seconds.get('total', 0):.0f} s in all "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in res.seconds.items() if k != 'total')}).", "",
             f"Data: `{res.split.data}` (sha256 {res.split.sha256[:12]}…, {res.split.n_records} records). "
             f"Calibration reads records [{res.split.cal_start}, {res.split.cal_end}) only; the benchmark reports "
             f"on [0, {res.split.heldout_end}). Records read: "
             + ", ".join(f"{k} [{v[0]}, {v[1]})" for k, v in res.records.items()) + ".", "",
             f"Written: `{hparams_path}`.", "", "## Edit layers (causal tracing)", ""]
    tr = res.trace
    if "given" in tr:
        lines.append(f"Given: {tr['given']}.")
    else:
        lines += [f"{tr['n']} known facts, {tr['samples']} noise samples, window {tr['window']}: MLP indirect effect "
                  f"peaks at layer {tr['peak_layer']}; best block of {tr['block_size']}: **{res.layers}**.", "",
                  "| layer | mean MLP IE |", "|---|---|"]
        lines += [f"| {i}{' *' if i in res.layers else ''} | {v:+.4f} |" for i, v in enumerate(tr["mean_mlp_effect"])]
    lines += ["", "## Memory layer, k and thresholds (subject fingerprints)", "",
              f"Budgets: general text fires on at most {100 * b['general_per_1000']:.3f}% of its tokens per 1,000 "
              f"entries, at most {100 * b['neighbour']:.1f}% of neighbourhood prompts read an entry, no negative "
              f"reaches an exact key, the span guard keeps {b['span_keep']:.0%} of multi-token paraphrases. "
              f"{cfg['general_tokens']} general-text tokens ({cfg['corpus']}, documents after the "
              f"{cfg['bg_docs']} of the background mean).", "",
              "| layer | k | threshold | paraphrases read own | with span guard | bare prompts (mask) | general fires "
              "| general (guarded) | neighbourhood prompts | exact thr | span thr | margin |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.settings:
        mark = " **(chosen)**" if (r.layer, r.k) == (s.layer, s.k) else ""
        lines.append(f"| {r.layer}{mark} | {r.k} | {r.threshold:.3f} | {r.recall:.3f} | {r.recall_guarded:.3f} | "
                     f"{r.bare_recall:.3f} | {100 * r.general_fire:.3f}% | {100 * r.general_fire_guarded:.3f}% | "
                     f"{100 * r.neighbour_fire:.2f}% | {r.exact_threshold:.3f} | {r.span_threshold:.3f} | "
                     f"{r.separation_general.margin:+.3f} |")
    lines += ["", "![overlaps](overlaps.png)", "", "Distributions at the chosen setting:", "", "```",
              json.dumps(s.distributions, indent=1), "```", "", "## v* probe", "",
              "| lr | converged | mean steps | steps per request | seconds |", "|---|---|---|---|---|"]
    for r in res.probe_runs:
        lines.append(f"| {r.lr:g} | {sum(r.converged)}/{len(r.converged)} | {r.mean_steps:.1f} | {r.steps} | "
                     f"{r.seconds:.1f} |")
    lines += ["", f"Chosen: v_lr {res.v_lr:g}, v_steps {res.v_steps}, stop at NLL {cfg['v_stop_nll']}.", "",
              "## Read shares and warm start", "",
              *read_share_lines(res), "",
              f"{res.repeat_share:.0%} of calibration facts repeat an earlier object: mm_warm_start "
              f"{str(res.warm_start).lower()}.", ""]
    return "\n".join(lines)


def read_share_lines(res: CalibrationResult) -> list[str]:
    """The read-share section: firing rate, forced-read damage per share, the floor probe, the schedule."""
    rd, cfg = res.read, res.config
    if rd is None:
        return [f"Per-entry firing rate on general text {res.fire_rate:.3g}: `mm_read_scale_by_entries: "
                f"{res.schedule}`."]
    d, fl = rd.damage, rd.floor_scores
    out = [f"General text read the memory {rd.fire_events} times in {rd.general_tokens} tokens: "
           f"{rd.fire_rate_point:.3g} per token per entry, {cfg['rate_confidence']:.0%} upper bound "
           f"**{res.fire_rate:.3g}** (used).", "",
           f"One forced read per window ({d.windows} general-text windows, {d.entries} calibration facts written; "
           f"the forced token is the window's most overlapping one: overlap median {d.overlap.get('median')}, "
           f"max {d.overlap.get('max')}; e.g. {', '.join(repr(t) for t in d.tokens[:6])}):", "",
           "| read share | window NLL rise (nats) | sd over windows | standard error |", "|---|---|---|---|"]
    out += [f"| {s:g} | {x:.3f} | {sd:.3f} | {sd / max(d.windows, 1) ** 0.5:.3f} |"
            for s, x, sd in zip(d.shares, d.damage, d.damage_sd)]
    out += ["", f"Damage ~ share ** **{d.exponent:g}**. A +{100 * cfg['ppl_budget']:g}% perplexity budget is "
            f"{100 * rd.fire_budget:.3f}% of tokens reading at full share.", "",
            "| read share | efficacy | generalization |", "|---|---|---|"]
    out += [f"| {s:g} | {e:.3f} | {g:.3f} |" for s, e, g in zip(fl["shares"], fl["efficacy"], fl["generalization"])]
    out += ["", f"Floor (lowest share at which the first {min(cfg['floor_facts'], d.entries)} facts keep "
            f"{cfg['floor_keep']:.0%} of efficacy + generalization): **{rd.floor:g}**. "
            f"`mm_read_scale_by_entries: {res.schedule}`."]
    return out


def write_report(res: CalibrationResult, out_dir: str | Path, hparams_path: str | Path, command: str) -> Path:
    from kedit.atomic import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_overlaps(res, out / "overlaps.png")
    write_json_atomic(out / "calibration.json", res.summary())
    write_text_atomic(out / "calibration.md", report_markdown(res, hparams_path, command))
    return out / "calibration.md"
