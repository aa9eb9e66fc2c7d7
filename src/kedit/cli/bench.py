"""`kedit bench lifelong`: sequential CounterFact editing benchmark (results.json / .md / curve.png)."""

from __future__ import annotations

from kedit.cli import workspace
from kedit.stats import DEFAULT_STATS_TOKENS


def register(sub) -> None:
    from kedit.cli.edit import add_model_args

    p = sub.add_parser("bench", help="benchmarks")
    s = p.add_subparsers(dest="bench_cmd", required=True)
    b = s.add_parser("lifelong", help="apply T CounterFact edits in batches of B, then measure every metric")
    add_model_args(b)
    b.add_argument("--method", default="alphaedit", choices=["rome", "memit", "alphaedit"])
    b.add_argument("--data", default=None, help="flat CounterFact JSON (default ../shared/data/counterfact-dev.json)")
    b.add_argument("--edits", "-T", type=int, default=100)
    b.add_argument("--batch", "-B", type=int, default=10)
    b.add_argument("--offset", type=int, default=0, help="index of the first record used")
    b.add_argument("--eval-every", type=int, default=0, help="batches between curve points (0: ~10 points)")
    b.add_argument("--fluency-prompts", type=int, default=32)
    b.add_argument("--ppl-tokens", type=int, default=10_000)
    b.add_argument("--stats-corpus", default="wiki-summaries-en")
    b.add_argument("--stats-tokens", type=int, default=DEFAULT_STATS_TOKENS)
    b.add_argument("--hparams", default=None, help="hyperparameter YAML (default: the model's file)")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one hyperparameter")
    b.add_argument("--out", "-o", default=None, help="write results.json, results.md and curve.png here")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_lifelong)


def _lifelong(args) -> int:
    from kedit.bench.lifelong import (
        DEFAULT_DATA,
        LifelongConfig,
        results_markdown,
        run_lifelong,
        write_results,
    )
    from kedit.cli.edit import _parse_set, load_lm

    cfg = LifelongConfig(method=args.method, data=args.data or str(DEFAULT_DATA), edits=args.edits,
                         batch=args.batch, offset=args.offset, eval_every=args.eval_every,
                         fluency_prompts=args.fluency_prompts, ppl_tokens=args.ppl_tokens,
                         stats_corpus=args.stats_corpus, stats_tokens=args.stats_tokens,
                         hparams_file=args.hparams, overrides=_parse_set(args.set))
    lm = load_lm(args)
    res = run_lifelong(lm, workspace(args), cfg, progress=not args.quiet)
    if args.out:
        write_results(res, args.out)
        print(f"results -> {args.out}/results.json, results.md, curve.png")
    print(results_markdown(res))
    return 0
