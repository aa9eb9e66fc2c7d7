"""`kedit calibrate --model M`: measure a model's editing settings on the calibration part of the
development data and write them as its hparams file, with a report of the measurements."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from kedit.cli import CLIError, workspace


def register(sub) -> None:
    from kedit.cli.edit import add_model_args

    p = sub.add_parser("calibrate", help="derive a model's editing settings from measurement on it (minutes)",
                       description="Causal tracing (edit layers), subject fingerprints (memory layer, k, read "
                                   "thresholds), a v* convergence probe and the read-share rule, on the "
                                   "calibration part of the development data (its last 10%%); writes the "
                                   "model's hparams file and a report.")
    add_model_args(p)
    p.add_argument("--data", default=None, help="flat CounterFact JSON (default ../shared/data/counterfact-dev.json)")
    p.add_argument("--records", type=int, default=500, help="calibration facts whose fingerprints are stored")
    p.add_argument("--trace-facts", type=int, default=12, help="known facts traced for the edit layers")
    p.add_argument("--layers", default=None, help="edit layers, e.g. 4-8 or 3,4,5 (skips tracing)")
    p.add_argument("--k", default="32,64,128", help="candidate fingerprint sizes")
    p.add_argument("--probe-requests", type=int, default=8, help="facts in the v* convergence probe")
    p.add_argument("--general-tokens", type=int, default=16_000, help="general-text tokens (negatives)")
    p.add_argument("--out", default=None,
                   help="hparams file to write (default: the workspace's models/<slug>/hparams.yaml)")
    p.add_argument("--carry-from", default=None,
                   help="file whose rome/memit/alphaedit/tpatcher blocks are carried over (default: the file "
                        "the model uses now, else default.yaml)")
    p.add_argument("--report", default=None, help="report folder (default: reports/calibration/<slug>)")
    p.set_defaults(func=_calibrate)


def parse_layers(text: str | None) -> list[int] | None:
    """``"4-8"`` or ``"3,4,5"`` -> layer list; a clear error otherwise."""
    if not text:
        return None
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            out = list(range(lo, hi + 1))
        else:
            out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--layers: expected e.g. 4-8 or 3,4,5, got {text!r}") from None
    if not out or min(out) < 0:
        raise CLIError(f"--layers: expected e.g. 4-8 or 3,4,5, got {text!r}")
    return out


def _calibrate(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kedit.bench.datasets import get_dataset
    from kedit.calibration.hparams_file import write_hparams
    from kedit.calibration.report import write_report
    from kedit.calibration.run import CalibrationConfig, calibrate
    from kedit.cli.edit import load_lm
    from kedit.editors.hparams import MODEL_HPARAMS, hparams_file_for, model_store_dir

    try:
        ks = tuple(int(x) for x in args.k.split(",") if x.strip())
    except ValueError:
        raise CLIError(f"--k: expected a comma list of integers, got {args.k!r}") from None
    if not ks or min(ks) <= 0:
        raise CLIError(f"--k: expected positive integers, got {args.k!r}")
    data = args.data or str(get_dataset("counterfact").default_data())
    if not Path(data).is_file():
        raise CLIError(f"--data: {data} does not exist")
    cfg = CalibrationConfig(data=data, records=args.records, trace_facts=args.trace_facts,
                            layers=parse_layers(args.layers), k_candidates=ks, probe_requests=args.probe_requests,
                            general_tokens=args.general_tokens)
    ws = workspace(args)
    lm = load_lm(args)
    store = model_store_dir(lm)
    if args.out:
        out = Path(args.out)
    elif store is not None:
        out = store / MODEL_HPARAMS
    else:
        raise CLIError(f"{args.model} is not a workspace model: pass --out FILE")
    carry = Path(args.carry_from) if args.carry_from else hparams_file_for(lm.slug, lm.adapter.model_type)
    if not carry.is_file():
        raise CLIError(f"--carry-from: {carry} does not exist")
    report_dir = Path(args.report) if args.report else ws.reports_dir / "calibration" / lm.slug
    argv = sys.argv[sys.argv.index("calibrate") + 1:] if "calibrate" in sys.argv else ["--model", args.model]
    command = "kedit calibrate " + shlex.join(argv)
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        res = calibrate(lm, cfg, ws.cache_dir, log=lambda m: console.log(m), tick=tick)
    path = write_hparams(out, res, carry, command, report=str(report_dir / "calibration.md"))
    md = write_report(res, report_dir, path, command)
    s = res.setting
    print(f"{lm.slug}: layers {res.layers}; memory at layer {s.layer}, k {s.k}, thresholds {s.threshold:.3f} / "
          f"exact {s.exact_threshold:.3f} / span {s.span_threshold:.3f}; v* lr {res.v_lr:g}, {res.v_steps} steps; "
          f"read shares {res.schedule}; {res.seconds['total']:.0f} s")
    print(f"wrote {path} and {md} (+ overlaps.png, calibration.json)")
    return 0
