"""`kedit feed validate|ingest|make|sample|schema`: daily fact-change feeds."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

from kedit.cli import workspace


def register(sub) -> None:
    p = sub.add_parser("feed", help="validate, ingest and make daily fact-change feeds")
    s = p.add_subparsers(dest="feed_cmd", required=True)

    v = s.add_parser("validate", help="run the feed expectation suite on one file (exit 0 = feed accepted)")
    v.add_argument("file")
    v.add_argument("--out", default=None,
                   help="folder for quarantine/ and reports/ (default: the workspace feeds/ folder)")
    _policy_args(v)
    v.set_defaults(func=_validate)

    i = s.add_parser("ingest", help="validate + quarantine + dedup one feed against the champion into the "
                                    "workspace feeds/ folder, recording its hash (no edits are applied); "
                                    "the same checks as the nightly ingest step")
    i.add_argument("file")
    i.add_argument("--json", default=None, help="also write the full result as JSON here")
    i.add_argument("--no-op-check", action="store_true",
                   help="also drop rows the champion model already answers (loads the model, as the nightly "
                        "step does)")
    _policy_args(i)
    i.set_defaults(func=_ingest)

    m = s.add_parser("make", help="turn a CounterFact flat-format JSON file into daily feed files")
    m.add_argument("--from", dest="src", required=True, help="CounterFact flat JSON (list of records)")
    m.add_argument("--days", type=int, default=3)
    m.add_argument("--per-day", type=int, default=50)
    m.add_argument("--out", default="feeds", help="output folder (default: feeds/)")
    m.add_argument("--start", type=date.fromisoformat, default=None,
                   help="first day YYYY-MM-DD (default: DAYS days before today)")
    m.add_argument("--seed", type=int, default=None, help="shuffle records with this seed (default: file order)")
    m.add_argument("--force", action="store_true", help="overwrite existing feed files")
    m.set_defaults(func=_make)

    sp = s.add_parser("sample", help="copy the shipped sample feed (30 fact changes) to OUT/DATE.jsonl")
    sp.add_argument("--out", default="feeds")
    sp.add_argument("--date", type=date.fromisoformat, default=None, help="file date (default: today)")
    sp.set_defaults(func=_sample)

    sc = s.add_parser("schema", help="print the JSON Schema of a feed row")
    _policy_args(sc)
    sc.set_defaults(func=_schema)


def _policy_args(p) -> None:
    p.add_argument("--params", default=None,
                   help="params.yaml whose feeds: block sets the limits (default: kedit.params lookup order)")


def _policy(args):
    from kedit.feeds.schema import FeedPolicy
    from kedit.params import load_params

    return FeedPolicy.from_params({"feeds": load_params(args.params, workspace(args)).block("feeds")})


def _summary(res) -> None:
    c = res.counts
    print(f"{res.path}: {'ACCEPTED' if res.passed else 'REJECTED'} - {res.message}")
    print(f"  rows {c['rows']}  valid {c['valid']}  quarantined {c['quarantined']}  dropped {c['dropped']}  "
          f"accepted {c['accepted']}  (sha256 {res.sha256[:12]})")
    for name, k in c["quarantine_reasons"].items():
        print(f"  quarantine  {name}: {k}")
    for name, k in c["drop_reasons"].items():
        print(f"  dropped     {name}: {k}")
    for note in res.notes:
        print(f"  note: {note}")
    if res.quarantine_path:
        print(f"  quarantine file: {res.quarantine_path}")
    print(f"  report: {res.report_path}")


def _validate(args) -> int:
    from kedit.feeds.ingest import ingest_feed
    from kedit.safepath import check_target

    ws = workspace(args)
    out = Path(args.out) if args.out else ws.feeds_dir
    for target in (out / "quarantine", out / "reports"):  # --out is the user's; no link may redirect inside it
        check_target(target, ws, "feed validate", within=None if args.out else ws.root, stores=False)
    res = ingest_feed(args.file, _policy(args), record=False,
                      quarantine_dir=out / "quarantine", report_dir=out / "reports")
    _summary(res)
    return 0 if res.passed else 1


def _ingest(args) -> int:
    from kedit.atomic import write_json_atomic
    from kedit.feeds.champion import ingest_for_champion

    ws = workspace(args)
    predictor = None
    if args.no_op_check:
        from kedit.config import RefreshConfig
        from kedit.feeds.champion import champion_predictor

        cfg = RefreshConfig.from_params()
        predictor = champion_predictor(ws, cfg.model, cfg.device)
    res = ingest_for_champion(ws, args.file, _policy(args), predictor=predictor)
    print(f"checked against champion {res.champion or 'base'} (facts already applied, flip-flops)")
    _summary(res)
    if args.json:
        write_json_atomic(args.json, res.to_dict())
    return 0 if res.passed else 1


def _make(args) -> int:
    from kedit.feeds.make import make_feeds

    summary = make_feeds(args.src, args.out, days=args.days, per_day=args.per_day, start=args.start,
                         seed=args.seed, overwrite=args.force)
    for f in summary.files:
        print(f"wrote {f}")
    print(f"{summary.rows} rows in {len(summary.files)} file(s); {summary.skipped} record(s) skipped "
          "(subject not in prompt, or braces in prompt)")
    return 0 if summary.files else 1


def _sample(args) -> int:
    from importlib import resources

    from kedit.atomic import write_bytes_atomic

    day = args.date or date.today()
    dest = Path(args.out) / f"{day}.jsonl"
    if dest.exists():
        from kedit.cli import CLIError

        raise CLIError(f"{dest} already exists")
    write_bytes_atomic(dest, resources.files("kedit").joinpath("data", "sample_feed.jsonl").read_bytes())
    print(f"wrote {dest}")
    return 0


def _schema(args) -> int:
    from kedit.feeds.schema import feed_schema

    json.dump(feed_schema(_policy(args)), sys.stdout, indent=2)
    print()
    return 0
