"""`kedit trace` (one causal trace) and `kedit trace aggregate` (over many known facts)."""

from __future__ import annotations

from pathlib import Path

from kedit.cli import CLIError, workspace


def register(sub) -> None:
    p = sub.add_parser("trace", help="causal tracing: where does the model recall a fact?", allow_abbrev=False,
                       description="ROME-style causal tracing of one prompt, or `kedit trace aggregate`.")
    _common(p)
    p.add_argument("--prompt", help="prompt with '{}' for the subject (or already containing the subject)")
    p.add_argument("--subject", help="the subject whose token embeddings are corrupted")
    p.add_argument("--target", default=None, help="answer to trace (default: the model's own greedy next token)")
    p.add_argument("--kinds", default="hidden,mlp,attn", help="comma list of hidden, mlp, attn")
    p.add_argument("--out", default=None, help="output folder (default: reports/trace/<model>/<subject>)")
    p.set_defaults(func=_trace)
    s = p.add_subparsers(dest="trace_cmd", metavar="aggregate")
    a = s.add_parser("aggregate", help="mean MLP indirect effect at the last subject token over known facts")
    _common(a)
    a.add_argument("--facts", required=True, help="JSON list or JSONL of {prompt, subject, ground_truth[, case_id]}")
    a.add_argument("--n", type=int, default=None, help="number of known facts to trace (params trace.n)")
    a.add_argument("--kinds", default=None, help="comma list (mlp always included; params trace.aggregate_kinds)")
    a.add_argument("--block-size", type=int, default=None, help="layers in the recommended block (params trace.block_size)")
    a.add_argument("--write", action="store_true", help="write the block into the model's hparams YAML (defaults.layers)")
    a.add_argument("--hparams", default=None, help="hparams YAML to update (default: kedit/hparams/<slug>.yaml)")
    a.add_argument("--out", default=None, help="output folder (default: reports/trace/<model>/aggregate)")
    a.set_defaults(func=_aggregate)


def _common(p) -> None:
    p.add_argument("--model", help="store slug or model directory")
    p.add_argument("--samples", type=int, default=None, help="noise samples (params trace.samples, 10)")
    p.add_argument("--noise", type=float, default=None, help="noise std as a multiple of the embedding std (3)")
    p.add_argument("--noise-scale", type=float, default=None, help="absolute noise std (overrides --noise)")
    p.add_argument("--window", type=int, default=None, help="neighbouring layers restored for mlp/attn (10)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-rows", type=int, default=None, help="rows per forward pass (memory vs speed)")
    p.add_argument("--params", default=None, help="params file with a trace: block (default: kedit.params lookup)")


def _settings(args) -> dict:
    from kedit.params import load_params

    cfg = {"samples": 10, "noise": 3.0, "window": 10, "seed": 0, "batch_rows": 512, "n": 100, "block_size": 5,
           "aggregate_kinds": ["mlp"]}
    cfg.update(load_params(args.params, workspace(args)).block("trace"))
    for k in ("samples", "noise", "window", "seed", "batch_rows", "n", "block_size"):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    return cfg


def _load(args):
    from kedit.models.store import load_model

    if not args.model:
        raise CLIError("--model is required (a store slug such as smollm2-135m, or a model directory)")
    return load_model(args.model, workspace(args))


def _kinds(text: str) -> list[str]:
    from kedit.tracing import KINDS

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise CLIError(f"--kinds: unknown {bad}; choose from {list(KINDS)}")
    return kinds


def _trace(args) -> int:
    from rich.console import Console

    from kedit.tracing import trace_fact
    from kedit.workspace import slugify

    if not args.prompt or not args.subject:
        raise CLIError("kedit trace needs --prompt and --subject (or the sub-command `aggregate`)")
    cfg = _settings(args)
    lm = _load(args)
    console = Console(stderr=True)
    kinds = _kinds(args.kinds)
    with console.status(f"tracing {len(kinds)} kinds x {lm.adapter.num_layers} layers x {cfg['samples']} samples"):
        res = trace_fact(lm, args.prompt, args.subject, args.target, kinds=kinds, samples=cfg["samples"],
                         noise=cfg["noise"], noise_scale=args.noise_scale, window=cfg["window"], seed=cfg["seed"],
                         batch_rows=cfg["batch_rows"], progress=lambda k: console.log(f"{k} done"))
    out = Path(args.out) if args.out else workspace(args).reports_dir / "trace" / lm.slug / slugify(args.subject)
    res.save(out)
    print(f"{res.prompt!r} -> {res.target!r}: clean p={res.clean_prob:.4f}, corrupted p={res.corrupted_prob:.4f}, "
          f"{res.forward_rows} rows in {res.seconds:.1f} s")
    for kind, eff in res.effects.items():
        best = max(((t, layer, v) for t, row in enumerate(eff) for layer, v in enumerate(row)), key=lambda x: x[2])
        print(f"  {kind:6s} max indirect effect {best[2]:+.4f} at token {best[0]} ({res.tokens[best[0]]!r}), layer {best[1]}")
    print(f"wrote {out / 'trace.json'} and {out / 'trace.png'}")
    return 0


def read_facts(path: str | Path) -> list[dict]:
    """A JSON list or JSONL file of fact records; a clear error names the file and line."""
    from kedit.records import read_records

    return read_records(path, "facts")


def _aggregate(args) -> int:
    from kedit.tracing import aggregate, hparams_path, write_layers

    cfg = _settings(args)
    kinds = _kinds(args.kinds) if args.kinds else list(cfg["aggregate_kinds"])
    lm = _load(args)
    facts = read_facts(args.facts)
    res = aggregate(lm, facts, n=cfg["n"], kinds=kinds, samples=cfg["samples"], noise=cfg["noise"],
                    window=cfg["window"], block_size=cfg["block_size"], seed=cfg["seed"], batch_rows=cfg["batch_rows"])
    out = Path(args.out) if args.out else workspace(args).reports_dir / "trace" / lm.slug / "aggregate"
    res.save(out)
    print(f"{lm.slug}: {res.n} known facts traced in {res.seconds:.0f} s; MLP effect peaks at layer {res.peak_layer}; "
          f"recommended layers {res.recommended_layers}")
    print("  mean MLP IE per layer: " + " ".join(f"{i}:{v:+.3f}" for i, v in enumerate(res.mean["mlp"])))
    print(f"wrote {out / 'aggregate.json'}, {out / 'aggregate.png'}, {out / 'aggregate.md'}")
    if args.write:
        path = Path(args.hparams) if args.hparams else hparams_path(lm.slug)
        write_layers(path, res.recommended_layers, note=f"kedit trace aggregate, n={res.n}, peak {res.peak_layer}")
        print(f"set defaults.layers = {res.recommended_layers} in {path}")
    return 0
