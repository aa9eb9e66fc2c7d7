"""`kedit edit` (compute and save deltas + editor state), `kedit generate` and `kedit predict`
(look at a model with edit directories applied in memory)."""

from __future__ import annotations

import json

from kedit.cli import workspace
from kedit.editors.hparams import METHODS
from kedit.stats import DEFAULT_STATS_TOKENS


def parse_set(items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` options as a dict, each value read as YAML (numbers, lists, booleans)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            from kedit.cli import CLIError

            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_model_args(p) -> None:
    p.add_argument("--model", "-m", default="smollm2-135m", help="model slug in the store (or store path)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy box)")


def load_lm(args):
    import torch

    from kedit.models.store import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, workspace(args), dtype=getattr(torch, args.dtype), device=args.device)


def register(sub) -> None:
    p = sub.add_parser("edit", help="apply a request file with one editor: memoir, AlphaEdit, MEMIT, ROME, T-Patcher "
                                    "(deltas and editor state)")
    add_model_args(p)
    p.add_argument("--method", default="alphaedit", choices=list(METHODS),
                   help="memoir: sparse residual memory (the nightly default, params.yaml refresh.method); "
                        "alphaedit, memit, rome: weight editors; tpatcher: patch neurons (default alphaedit)")
    p.add_argument("--requests", "-r", required=True,
                   help="JSON/JSONL: {prompt with {}, subject, target_new[, target_true, id]} or flat CounterFact")
    p.add_argument("--out", "-o", required=True, help="directory for deltas.safetensors, state.*, result.json")
    p.add_argument("--state", default=None, help="edit directory whose editor state to continue from")
    p.add_argument("--base-edit", dest="base_edits", action="append", default=[], metavar="DIR",
                   help="edit directory applied before editing (repeat, in order): the current lineage")
    p.add_argument("--batch", type=int, default=0, help="requests per editing batch (0: all at once)")
    p.add_argument("--hparams", default=None, help="hyperparameter YAML (default: the model's file)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one hyperparameter")
    p.add_argument("--stats-corpus", default="wiki-summaries-en")
    p.add_argument("--stats-tokens", type=int, default=DEFAULT_STATS_TOKENS)
    p.set_defaults(func=_edit)

    g = sub.add_parser("generate", help="generate text, optionally with edit directories applied")
    add_model_args(g)
    g.add_argument("prompts", nargs="+")
    g.add_argument("--edits", action="append", default=[], metavar="DIR", help="edit directory to apply (repeat)")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--sample", action="store_true", help="top-k 5 sampling (default greedy)")
    g.set_defaults(func=_generate)

    pr = sub.add_parser("predict", help="top next tokens and target scores, optionally with edits applied")
    add_model_args(pr)
    pr.add_argument("prompts", nargs="+")
    pr.add_argument("--edits", action="append", default=[], metavar="DIR", help="edit directory to apply (repeat)")
    pr.add_argument("--target", dest="targets", action="append", default=[],
                    help="score this target after every prompt (repeat)")
    pr.add_argument("--top", type=int, default=5)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=_predict)


def _apply_dirs(lm, dirs: list[str]) -> None:
    """Add each edit directory's weight deltas; the last directory's editor state decides the added
    computations (an added-capacity editor's state attaches its parameters, any other state none)."""
    from kedit.editors.base import apply_deltas
    from kedit.editors.io import load_deltas, load_state
    from kedit.editors.registry import attach_state

    for d in dirs:
        apply_deltas(lm.model, load_deltas(d))
    if dirs:
        attach_state(lm, load_state(dirs[-1]))


def _edit(args) -> int:
    from rich.console import Console

    from kedit.editors.io import load_requests, load_state, save_edit
    from kedit.editors.session import BatchReport
    from kedit.editors.setup import prepare_edit

    console = Console(stderr=True)
    ws = workspace(args)
    requests = load_requests(args.requests)
    if not requests:
        from kedit.cli import CLIError

        raise CLIError(f"{args.requests}: no edit requests")
    lm = load_lm(args)
    _apply_dirs(lm, args.base_edits)
    setup = prepare_edit(lm, args.method, ws, hparams_file=args.hparams, overrides=parse_set(args.set),
                         stats_corpus=args.stats_corpus, stats_tokens=args.stats_tokens,
                         progress=lambda it, active, nll: console.log(f"v* step {it}: {active} active, NLL {nll:.3f}")
                         if args.verbose else None)
    hp = setup.hp
    state = load_state(args.state) if args.state else None

    def log_batch(rep: BatchReport) -> None:
        met = sum(d.constraint_met for d in rep.result.diagnostics)
        console.log(f"batch {rep.index + 1}: {rep.n} edits in {rep.seconds:.1f}s, v* constraint met {met}/{rep.n}")

    result = setup.session(lm, state).apply(requests, args.batch, on_batch=log_batch)
    save_edit(args.out, result, {"method": args.method, "model": lm.slug, "model_hash": lm.manifest.model_hash,
                                 "hparams": hp.to_dict(), "requests": [r.to_dict() for r in requests],
                                 "base_edits": args.base_edits, "layer_info_per_batch": result.batch_layer_info})
    print(f"{len(requests)} edits ({args.method}) in {result.seconds:.1f}s -> {args.out}")
    return 0


def _generate(args) -> int:
    import torch

    lm = load_lm(args)
    _apply_dirs(lm, args.edits)
    tok = lm.tokenizer
    for prompt in args.prompts:
        ids = tok(prompt, return_tensors="pt").to(lm.device)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = lm.model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                    top_k=5 if args.sample else None, top_p=None, temperature=None,
                                    pad_token_id=tok.pad_token_id)
        print(prompt + tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def _predict(args) -> int:
    import torch

    from kedit.evaluation.metrics import next_token_logprobs, target_logprobs

    lm = load_lm(args)
    _apply_dirs(lm, args.edits)
    logp = next_token_logprobs(lm, args.prompts)
    rows = []
    for i, prompt in enumerate(args.prompts):
        top = torch.topk(logp[i], args.top)
        row = {"prompt": prompt, "top": [(lm.tokenizer.decode([int(t)]), round(float(v.exp()), 4))
                                         for v, t in zip(top.values, top.indices)]}
        if args.targets:
            scores = target_logprobs(lm, [prompt] * len(args.targets), args.targets)
            row["targets"] = {t: round(float(s), 4) for t, s in zip(args.targets, scores)}
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            tops = ", ".join(f"{t!r} {p:.3f}" for t, p in row["top"])
            print(f"{row['prompt']!r}: {tops}")
            for t, s in row.get("targets", {}).items():
                print(f"    {t!r}: mean log-prob {s:.3f}")
    return 0
