"""`kedit bench lifelong`: sequential CounterFact or zsRE editing benchmark (results.json / .md / curve.png);
`kedit bench solvers`: one batch, v* once, solver settings compared (results.json / .md / frontier.png);
`kedit bench refresh`: nightly refreshes of N facts end to end, seconds per step (results.json / .md / steps.png);
`kedit bench tables`: the README's and docs/benchmarks.md's tables, generated from the lifelong reports."""

from __future__ import annotations

from kedit.bench.tables import EVAL_OPTIONS
from kedit.cli import workspace
from kedit.editors.hparams import METHODS
from kedit.stats import DEFAULT_STATS_TOKENS


def _add_run_args(p, edits_help: str, set_help: str, plot: str) -> None:
    """Arguments both CounterFact benchmarks take: model, method, records, evaluation, statistics,
    hyperparameters, output."""
    from kedit.cli.edit import add_model_args

    add_model_args(p)
    p.add_argument("--method", default="alphaedit", choices=list(METHODS))
    p.add_argument("--data", default=None, help="flat CounterFact JSON (default ../shared/data/counterfact-dev.json)")
    p.add_argument("--edits", "-T", type=int, default=100, help=edits_help)
    p.add_argument("--offset", type=int, default=0, help="index of the first record used")
    p.add_argument("--ppl-tokens", type=int, default=EVAL_OPTIONS["ppl_tokens"][1])
    p.add_argument("--stats-corpus", default="wiki-summaries-en")
    p.add_argument("--stats-tokens", type=int, default=DEFAULT_STATS_TOKENS)
    p.add_argument("--hparams", default=None, help="hyperparameter YAML (default: the model's file)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.add_argument("--out", "-o", default=None, help=f"write results.json, results.md and {plot} here")
    p.add_argument("--quiet", action="store_true")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    s = p.add_subparsers(dest="bench_cmd", required=True)
    b = s.add_parser("lifelong", help="apply T CounterFact (or zsRE) edits in batches of B, then measure every metric")
    _add_run_args(b, "records edited in all", "override one hyperparameter", "curve.png")
    b.add_argument("--dataset", default="counterfact", choices=["counterfact", "zsre"],
                   help="counterfact (efficacy/generalization/specificity) or zsre (reliability/generalization/"
                        "locality, token-level); --data defaults to ../shared/data/<its file>")
    b.add_argument("--batch", "-B", type=int, default=10)
    b.add_argument("--eval-every", type=int, default=EVAL_OPTIONS["eval_every"][1], help="batches between curve points (0: ~10 points)")
    b.add_argument("--curve-records", type=int, default=EVAL_OPTIONS["curve_records"][1], metavar="N",
                   help="curve points before the last score N evenly spaced records of those edited so far "
                        "(default 0: all); the final evaluation scores every record")
    b.add_argument("--fluency-prompts", type=int, default=EVAL_OPTIONS["fluency_prompts"][1],
                   help="first N edit prompts for fluency and greedy entropy (default 100; 0: all)")
    b.add_argument("--freegen-tokens", type=int, default=EVAL_OPTIONS["freegen_tokens"][1], metavar="N",
                   help="greedy tokens after each edit, paraphrase and neighbourhood prompt for the free-generation "
                        "scores (ES/PS/NS gen; default 8; 0: not measured)")
    b.add_argument("--skip-invalid", action="store_true",
                   help="leave out records that fail the data set's check (each listed with its reason in "
                        "the results) and take the next valid ones")
    b.add_argument("--allow-calibration-records", action="store_true",
                   help="report on records the hparams file's calibration read (refused otherwise; the report "
                        "then says the numbers are not held out)")
    b.add_argument("--save-edit", action="store_true",
                   help="also write the summed deltas and the final editor state to OUT/edit (a `kedit edit` directory)")
    b.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write the run's progress to OUT/checkpoint.safetensors every N batches (and after the last)")
    b.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.safetensors (same arguments; starts afresh if there is none)")
    b.add_argument("--fresh-baseline", action="store_true",
                   help="score the unedited model again instead of reading it from the workspace cache (where a "
                        "run on the same model, records and scoring code kept it)")
    b.set_defaults(func=_lifelong)

    w = s.add_parser("solvers", help="one batch of edits, v* optimised once, solver settings compared "
                                     "(efficacy vs perplexity frontier)")
    _add_run_args(w, "records in the one batch", "override shared by every setting", "frontier.png")
    w.add_argument("--grid", action="append", metavar="KEY=[V1, V2]",
                   help="an axis of the sweep (YAML list); several axes give their product")
    w.add_argument("--setting", action="append", metavar="{KEY: VALUE, ...}",
                   help="one more setting (YAML mapping), after the grid's; '{}' is the file's defaults")
    w.set_defaults(func=_solvers)

    r = s.add_parser("refresh", help="one nightly refresh of N facts end to end (ingest .. decide), seconds per step")
    r.add_argument("--facts", "-n", type=int, default=100,
                   help="rows in the feed: the 30-row sample feed, then CounterFact records (default 100)")
    r.add_argument("--nights", type=int, default=1,
                   help="refreshes one after the other, each with the next --facts rows, each approved when its "
                        "gate passes; the first also pays what a lineage does once (default 1)")
    r.add_argument("--model", "-m", default="smollm2-135m",
                   help="model slug, already imported in the workspace (-w) the bench links it from")
    r.add_argument("--method", default=None, choices=list(METHODS),
                   help="editor (default: params.yaml refresh.method)")
    r.add_argument("--set", action="append", metavar="BLOCK.KEY=VALUE",
                   help="override one params.yaml setting of the bench workspace, e.g. refresh.trace_sample=0")
    r.add_argument("--params", default=None, help="params.yaml to start from (default: the project's)")
    r.add_argument("--data", default=None, help="flat CounterFact JSON for rows past the sample feed "
                                                "(default ../shared/data/counterfact-dev.json)")
    r.add_argument("--dir", default="bench-out/refresh-ws",
                   help="the bench's own workspace, replaced on each run (default bench-out/refresh-ws)")
    r.add_argument("--out", "-o", default="bench-out/refresh", help="results.json, results.md, steps.png (and profiles) here")
    r.add_argument("--profile", action="store_true",
                   help="cProfile each step: OUT/<step>.prof and OUT/<step>.txt (the most expensive calls)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_refresh)

    t = s.add_parser("tables", help="regenerate docs/benchmarks.md and the README's results table from the "
                                    "lifelong reports (--check: fail if they are out of date)")
    t.add_argument("--reports", default="docs/bench", help="folder of report folders (default docs/bench)")
    t.add_argument("--docs", default="docs/benchmarks.md", help="the generated benchmarks page")
    t.add_argument("--readme", default="README.md", help="file with the results-table markers ('' for none)")
    t.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    t.set_defaults(func=_tables)


def _lifelong(args) -> int:
    from kedit.bench.datasets import get_dataset
    from kedit.bench.lifelong import (
        LifelongConfig,
        results_markdown,
        run_lifelong,
        write_results,
    )
    from kedit.cli.edit import load_lm, parse_set

    cfg = LifelongConfig(method=args.method, data=args.data or str(get_dataset(args.dataset).default_data()),
                         dataset=args.dataset, edits=args.edits, skip_invalid=args.skip_invalid,
                         batch=args.batch, offset=args.offset, eval_every=args.eval_every,
                         curve_records=args.curve_records,
                         fluency_prompts=args.fluency_prompts or None, ppl_tokens=args.ppl_tokens,
                         freegen_tokens=args.freegen_tokens,
                         stats_corpus=args.stats_corpus, stats_tokens=args.stats_tokens,
                         hparams_file=args.hparams, overrides=parse_set(args.set),
                         allow_calibration_records=args.allow_calibration_records)
    from kedit.cli import CLIError

    if args.save_edit and not args.out:
        raise CLIError("--save-edit needs --out")
    if (args.checkpoint_every or args.resume) and not args.out:
        raise CLIError("--checkpoint-every and --resume need --out (the checkpoint is OUT/checkpoint.safetensors)")
    if args.checkpoint_every < 0:
        raise CLIError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    from pathlib import Path

    ckpt = Path(args.out) / "checkpoint.safetensors" if args.out else None
    lm = load_lm(args)
    res = run_lifelong(lm, workspace(args), cfg, progress=not args.quiet,
                       edit_out=f"{args.out}/edit" if args.save_edit else None,
                       checkpoint=ckpt if (args.checkpoint_every or args.resume) else None,
                       checkpoint_every=args.checkpoint_every, resume=args.resume,
                       baseline_cache=not args.fresh_baseline)
    if args.out:
        write_results(res, args.out)
        print(f"results -> {args.out}/results.json, results.md, curve.png")
        if ckpt is not None and ckpt.exists():  # the results are written: the progress record is spent
            ckpt.unlink()
    print(results_markdown(res))
    return 0


def _sweep_settings(grid_args: list[str] | None, setting_args: list[str] | None) -> list[dict]:
    import yaml

    from kedit.bench.solvers import grid
    from kedit.cli import CLIError

    axes = {}
    for item in grid_args or []:
        key, sep, value = item.partition("=")
        values = yaml.safe_load(value) if sep else None
        if not sep or not isinstance(values, list) or not values:
            raise CLIError(f"--grid expects KEY=[V1, V2, ...], got {item!r}")
        axes[key.strip()] = values
    settings = grid(axes) if axes else []
    for item in setting_args or []:
        value = yaml.safe_load(item)
        if not isinstance(value, dict):
            raise CLIError(f"--setting expects a YAML mapping such as '{{L2: 5}}', got {item!r}")
        settings.append(value)
    return settings or [{}]


def _solvers(args) -> int:
    from kedit.bench.lifelong import DEFAULT_DATA
    from kedit.bench.solvers import SweepConfig, run_sweep, sweep_markdown, write_sweep
    from kedit.cli.edit import load_lm, parse_set

    cfg = SweepConfig(method=args.method, data=args.data or str(DEFAULT_DATA), edits=args.edits, offset=args.offset,
                      ppl_tokens=args.ppl_tokens, stats_corpus=args.stats_corpus, stats_tokens=args.stats_tokens,
                      hparams_file=args.hparams, base=parse_set(args.set),
                      settings=_sweep_settings(args.grid, args.setting))
    lm = load_lm(args)
    res = run_sweep(lm, workspace(args), cfg, progress=not args.quiet)
    if args.out:
        write_sweep(res, args.out)
        print(f"results -> {args.out}/results.json, results.md, frontier.png")
    print(sweep_markdown(res))
    return 0


def _refresh(args) -> int:
    import sys

    from kedit.bench.refresh import RefreshBenchConfig, run_refresh_bench
    from kedit.cli.edit import parse_set

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    if args.method:
        overrides["refresh.method"] = args.method
    cfg = RefreshBenchConfig(facts=args.facts, nights=args.nights, model=args.model, data=args.data, params=args.params,
                             overrides=overrides, profile=args.profile)
    log = (lambda _m: None) if args.quiet else (lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    res = run_refresh_bench(args.dir, workspace(args), cfg, args.out, log=log)
    print(res.table())
    if args.profile:
        print(f"profiles -> {args.out}/night<k>-<step>.prof, .txt")
    print(f"results -> {args.out}/results.json, results.md, steps.png")
    return 0


def _tables(args) -> int:
    from pathlib import Path

    from kedit.bench.tables import write_tables

    changed = write_tables(Path(args.reports), Path(args.docs), Path(args.readme) if args.readme else None,
                           check=args.check)
    for p in changed:
        print(f"{'out of date' if args.check else 'written'}: {p}")
    if not changed:
        print("benchmark tables are up to date")
    return 1 if (args.check and changed) else 0
