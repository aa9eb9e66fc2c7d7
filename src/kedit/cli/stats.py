"""`kedit stats compute|show|bench`."""

from __future__ import annotations

import json

from kedit.cli import workspace
from kedit.stats import DEFAULT_STATS_TOKENS


def parse_layers(text: str) -> list[int]:
    """'4-8' -> [4..8]; '3,5,7' -> [3,5,7]; '4-6,9' -> [4,5,6,9]."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError(f"no layers in {text!r}")
    return sorted(set(out))


def register(sub) -> None:
    p = sub.add_parser("stats", help="key second-moment statistics E[k kᵀ] over a text corpus")
    s = p.add_subparsers(dest="stats_cmd", required=True)
    c = s.add_parser("compute", help="collect statistics (resumable) into stats/<model>/<corpus>/")
    c.add_argument("--model", required=True)
    c.add_argument("--layers", required=True, help="e.g. 4-8 or 3,5,7")
    c.add_argument("--corpus", default="wiki-summaries-en",
                   help="wiki-summaries-en (default), a .txt/.jsonl path, or hf:NAME[:CONFIG[:SPLIT]]")
    c.add_argument("--max-tokens", type=int, default=DEFAULT_STATS_TOKENS)
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--device", default="cpu")
    c.add_argument("--force", action="store_true")
    c.set_defaults(func=_compute)
    sh = s.add_parser("show", help="print the manifests of computed statistics")
    sh.add_argument("--model", default=None)
    sh.set_defaults(func=_show)
    b = s.add_parser("bench", help="tokens/s of statistics collection vs a plain forward pass")
    b.add_argument("--model", required=True)
    b.add_argument("--layers", default="3-9")
    b.add_argument("--tokens", type=int, default=60_000)
    b.add_argument("--seq-len", type=int, default=256)
    b.add_argument("--batch-size", type=int, default=16)
    b.set_defaults(func=_bench)


def _compute(args) -> int:
    from kedit.models.store import load_model
    from kedit.stats.collect import compute_stats

    ws = workspace(args)
    lm = load_model(args.model, ws, device=args.device)
    b = compute_stats(lm, parse_layers(args.layers), ws, args.corpus, max_tokens=args.max_tokens,
                      seq_len=args.seq_len, batch_size=args.batch_size, force=args.force)
    m = b.manifest
    print(f"stats {m['model_slug']} / {m['corpus']}: layers {m['layers']}, {m['n_tokens']:,} tokens, "
          f"{m['seconds']} s ({m['tokens_per_second']:,.0f} tok/s in forward+accumulate) -> {b.dir}")
    return 0


def _show(args) -> int:
    ws = workspace(args)
    for mf in sorted(ws.stats_dir.glob("*/*/manifest.json")):
        m = json.loads(mf.read_text())
        if args.model and m.get("model_slug") != args.model:
            continue
        print(f"{mf.parent.relative_to(ws.root)}: layers {m['layers']}, {m['n_tokens']:,} tokens, key {m['key'][:12]}")
    return 0


def _bench(args) -> int:
    from kedit.models.store import load_model
    from kedit.stats.throughput import measure_throughput

    ws = workspace(args)
    lm = load_model(args.model, ws)
    r = measure_throughput(lm, parse_layers(args.layers), max_tokens=args.tokens, seq_len=args.seq_len,
                           batch_size=args.batch_size)
    print(json.dumps(r, indent=2))
    return 0
