"""`kedit lineage log|show|diff|verify|repair|seal|gate|approve|promote`, `kedit rollback S`, `kedit retract FACT`,
`kedit export S --out DIR`."""

from __future__ import annotations

import json
import sys

from kedit.cli import CLIError, workspace


def register(sub) -> None:
    p = sub.add_parser("lineage", help="audit the edit-state tree (log, show, diff, verify, promote)")
    s = p.add_subparsers(dest="lineage_cmd", required=True)
    lg = s.add_parser("log", help="the state tree: dates, feeds, edit counts, gate verdicts, champion marked")
    lg.add_argument("--json", action="store_true", help="machine-readable output")
    lg.set_defaults(func=_log)
    sh = s.add_parser("show", help="one state's record and events (id, unique prefix, or 'champion')")
    sh.add_argument("state")
    sh.set_defaults(func=_show)
    df = s.add_parser("diff", help="facts added/removed and per-module weight change between two states")
    df.add_argument("a", help="from state ('base' for the base model)")
    df.add_argument("b", help="to state")
    df.add_argument("--json", action="store_true")
    df.set_defaults(func=_diff)
    vf = s.add_parser("verify", help="re-hash every file and replay every state against its recorded hashes")
    vf.add_argument("--quick", action="store_true", help="files and records only, no replay")
    vf.set_defaults(func=_verify)
    rp = s.add_parser("repair", help="finish an interrupted promote/rollback; move git, DVC and MLflow to the "
                                     "lineage's champion")
    rp.set_defaults(func=_repair)
    se = s.add_parser("seal", help="vouch for the events written before the event chain (once, after checking "
                                   "them), so their gate verdicts and approvals count for promotions")
    se.add_argument("--by", default=None, help="name recorded beside your OS identity")
    se.add_argument("--comment", default="")
    se.set_defaults(func=_seal)
    gt = s.add_parser("gate", help="gate a candidate state against its parent (e.g. a retraction) and record the "
                                   "verdict; exits 1 if any check fails")
    gt.add_argument("state", help="state id or unique prefix (not the champion, not 'base')")
    gt.add_argument("--by", default=None, help="name recorded with the verdict (default: $KEDIT_IDENTITY "
                                               "or the OS user)")
    gt.add_argument("--no-mlflow", action="store_true", help="do not log the candidate and its gate to MLflow")
    gt.set_defaults(func=_gate)
    ap = s.add_parser("approve", help="record your approval of a state (after reading its gate report)")
    ap.add_argument("state")
    ap.add_argument("--by", default=None, help="name recorded beside your OS identity (default: $KEDIT_IDENTITY "
                                               "or the OS user)")
    ap.add_argument("--comment", default="")
    ap.add_argument("--key", default=None, help="your SSH private key, to sign the approval when "
                                                "lineage.approval_signing is ssh (default: $KEDIT_SIGNING_KEY, "
                                                "else git config user.signingkey)")
    ap.set_defaults(func=_approve)
    pr = s.add_parser("promote", help="make a state the champion: needs a passed gate and an approval")
    pr.add_argument("state")
    pr.add_argument("--by", default=None, help="name recorded beside your OS identity (default: $KEDIT_IDENTITY "
                                               "or the OS user)")
    pr.add_argument("--comment", default="")
    pr.add_argument("--force", action="store_true",
                    help="promote although the gate failed or no approval is recorded (needs --reason; "
                         "recorded as an override)")
    pr.add_argument("--reason", default=None, help="why the rules are overridden (with --force)")
    _follow_flags(pr)
    pr.set_defaults(func=_promote)

    rb = sub.add_parser("rollback", help="make an earlier edit state (or 'base') the champion again")
    rb.add_argument("state", help="state id, unique prefix, or 'base'")
    rb.add_argument("--reason", required=True, help="why (kept in the lineage events)")
    rb.add_argument("--by", default=None, help="name recorded beside your OS identity (default: $KEDIT_IDENTITY "
                                               "or the OS user)")
    rb.add_argument("--force", action="store_true",
                    help="roll back to a state that was never champion nor an ancestor of one (an override)")
    _follow_flags(rb)
    rb.set_defaults(func=_rollback)

    rt = sub.add_parser("retract", help="remove one fact exactly from a T-Patcher / memory state, as a new "
                                        "candidate state (weight editors: offers an edit back)")
    rt.add_argument("fact", help="the fact's id (a feed row id)")
    rt.add_argument("--by", required=True, help="who retracts it (recorded in the new state)")
    rt.add_argument("--reason", required=True, help="why (recorded in the new state)")
    rt.add_argument("--state", default="champion", help="state to retract from (default: the champion)")
    rt.add_argument("--request-out", default=None,
                    help="where to write the edit-back request for a weight editor's fact "
                         "(default: <workspace>/retractions/<fact>-edit-back.jsonl)")
    rt.set_defaults(func=_retract)

    ex = sub.add_parser("export", help="write a full HuggingFace model directory of an edit state")
    ex.add_argument("state", help="state id, unique prefix, 'champion' or 'base'")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    ex.set_defaults(func=_export)


def _follow_flags(p) -> None:
    p.add_argument("--no-mlflow", action="store_true", help="do not move the MLflow registry aliases")
    p.add_argument("--no-dvc", action="store_true", help="do not commit and tag the files in git + DVC")


def _store(args):
    from kedit.lineage.ops import lineage_params, open_store

    ws = workspace(args)
    params = lineage_params(ws)
    if not (ws.lineage_dir / "states").exists():
        raise CLIError(f"no lineage store in {ws.lineage_dir} (nothing has been edited in this workspace)")
    return ws, params, open_store(ws, params)


def _who(args) -> str:
    """The free-text name an event records in ``by`` (the OS identity is recorded beside it anyway)."""
    from kedit.lineage.identity import current_actor

    return args.by or current_actor().identity


def _follow(args, ws, params) -> tuple[bool, bool]:
    from kedit.lineage.ops import stores_present

    mlflow, dvc = stores_present(ws, params)
    return mlflow and not args.no_mlflow, dvc and not args.no_dvc


def _verdict(gate: dict | None) -> str:
    if not gate:
        return "gate: -"
    passed = gate.get("passed", gate.get("pass", gate.get("ok")))
    return "gate: PASS" if passed else ("gate: FAIL" if passed is not None else "gate: recorded")


def _people(events) -> str:
    """``alice`` or ``alice [bob]`` per event; control characters escaped (kedit.lineage.text)."""
    from kedit.lineage.identity import describe
    from kedit.lineage.text import escape_text

    out = []
    for e in events:
        actor = describe(e.actor)
        out.append(escape_text(e.by if not actor or actor == e.by else f"{e.by} [{actor}]"))
    return ", ".join(dict.fromkeys(out))


def _drift_column(gate: dict | None) -> str:
    """``  drift ppl +x.x%``: the state's cumulative perplexity change from the base model, as gated."""
    from kedit.evaluation.drift import drift_label

    text = drift_label(gate)
    return f"  [{'red' if '(drift FAIL)' in text else 'dim'}]{text}[/]" if text else ""


def _log(args) -> int:
    ws, _, store = _store(args)
    entries = store.log()
    if args.json:
        print(json.dumps([{"id": e.state.id, "parent": e.state.parent, "created_at": e.state.created_at,
                           "feed": e.state.feed, "method": e.state.method, "n_edits": e.state.n_edits,
                           "gate": e.gate, "champion": e.champion, "children": e.children,
                           "approvals": [a.to_dict() for a in e.approvals],
                           "promotions": [a.to_dict() for a in e.promotions],
                           "overrides": [a.to_dict() for a in e.overrides]} for e in entries], indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape as _markup
    from rich.tree import Tree

    from kedit.lineage.text import escape_text

    def escape(text) -> str:  # rich markup and terminal control characters both shown as text
        return _markup(escape_text(text))

    by_id = {e.state.id: e for e in entries}
    champ = store.champion()
    root = Tree(f"[bold]base model[/] {entries[0].state.base_model_slug if entries else ''}"
                + ("  [bold yellow]★ champion[/]" if entries and champ is None else ""))

    def label(e) -> str:
        s = e.state
        feed = "feed " + escape(s.feed.get("path") or s.feed.get("name") or str(s.feed.get("file_sha256", ""))[:12])
        if s.feed.get("kind") == "retraction":  # kedit.lineage.retract: no feed, one fact taken out
            feed = (f"[magenta]retraction of {escape(', '.join(s.feed.get('retracted', [])))} by "
                    f"{escape(str(s.feed.get('by')))}: {escape(str(s.feed.get('reason')))}[/]")
        approved = _people(e.approvals)
        if store.signing.on:  # approvals from before approval signing was on are shown, but do not count
            signed, unsigned = _people([a for a in e.approvals if a.signature]), _people(
                [a for a in e.approvals if not a.signature])
            approved = ", ".join([*([signed] if signed else []),
                                  *([f"{unsigned} (unsigned: does not count)"] if unsigned else [])])
        promoted = _people([p for p in e.promotions if p.type == "promote"])
        star = "[bold yellow]★ champion[/] " if e.champion else ""
        verdict = _verdict(e.gate)
        colour = "green" if "PASS" in verdict else ("red" if "FAIL" in verdict else "dim")
        overrides = "".join(f"  [bold red]OVERRIDE ({o.data.get('action', '?')}) by {escape(_people([o]))}: "
                            f"{escape(o.comment)}[/]" for o in e.overrides)
        overrides += "".join(f"  [yellow]override ({o.data.get('action', '?')}) by {escape(_people([o]))} not "
                             f"followed by its {o.data.get('action', '?')} (interrupted; nothing moved)[/]"
                             for o in e.unfinished_overrides)
        overrides += "".join(f"  [bold red]UNTRUSTED {escape(f)}: {escape(why)}[/]" for f, why in e.untrusted.items())
        return (f"{star}[cyan]{s.short}[/] {escape(s.created_at)}  {escape(s.method)}  {feed}  {s.n_edits} edits  "
                f"[{colour}]{verdict}[/]" + _drift_column(e.gate) + (f"  approved by {escape(approved)}" if approved else "")
                + (f"  promoted by {escape(promoted)}" if promoted else "") + overrides
                + ("  [dim](snapshot)[/]" if s.snapshot else ""))

    def add(node, sid) -> None:
        e = by_id[sid]
        child = node.add(label(e))
        for c in e.children:
            add(child, c)

    for e in entries:
        if e.state.parent is None:
            add(root, e.state.id)
    Console().print(root)
    print(f"{len(entries)} states, {len(store.branches())} branches; lineage at {ws.lineage_dir}")
    return 0


def _show(args) -> int:
    from kedit.lineage.ops import render_show

    _, _, store = _store(args)
    print(render_show(store, args.state))
    return 0


def _diff(args) -> int:
    _, _, store = _store(args)
    a = None if args.a == "base" else store.resolve(args.a)
    b = None if args.b == "base" else store.resolve(args.b)
    d = store.diff(a, b)
    d["rows"] = _row_diff(store, a, b)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{(a or 'base')[:12]} -> {(b or 'base')[:12]}   common ancestor: "
          f"{(d['common_ancestor'] or 'base')[:12]}")
    print(f"facts added ({len(d['added'])}): {', '.join(d['added']) or '-'}")
    print(f"facts removed ({len(d['removed'])}): {', '.join(d['removed']) or '-'}")
    from kedit.cli.tables import print_table

    print_table([("module", "left"), ("||W_b - W_a||", "right"), ("||W_b||", "right")],
                [[n, f"{v['delta_norm']:.6f}", f"{v['weight_norm']:.4f}"] for n, v in d["modules"].items()])
    rows = d["rows"]
    if rows:
        print(f"added rows ({rows['from_method'] or '-'} {rows['rows_from']} rows -> "
              f"{rows['to_method'] or '-'} {rows['rows_to']} rows; the fact that owns each):")
        for what, side in (("added", "in " + (b or "base")[:12]), ("removed", "in " + (a or "base")[:12])):
            for fact, idx in rows[what].items():
                print(f"  {'+' if what == 'added' else '-'} fact {fact}: rows {_ranges(idx)} {side}")
        if not rows["added"] and not rows["removed"]:
            print("  no fact gained or lost a row")
    return 0


def _row_diff(store, a: str | None, b: str | None) -> dict | None:
    """Owners of the added rows (patches, memory entries) on each side; None when neither side has any."""
    from kedit.lineage.retract import owner_diff, row_owners

    oa, ob = row_owners(store, a), row_owners(store, b)
    return owner_diff(oa, ob) if oa or ob else None


def _ranges(idx: list[int]) -> str:
    """``0-2,5``: row indices as ranges."""
    out, start = [], None
    for i, x in enumerate(idx):
        if start is None:
            start = x
        if i + 1 == len(idx) or idx[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def _verify(args) -> int:
    from rich.progress import Progress

    from kedit.lineage.ops import base_model_problems, divergences

    ws, params, store = _store(args)
    with Progress(transient=True) as prog:
        task = prog.add_task("replaying states", total=None)
        rep = store.verify(deep=not args.quick,
                           progress=lambda i, n: prog.update(task, completed=i, total=n))
    print(f"checked {rep.states} states, {rep.files} files, {rep.tensors} tensor hashes")
    for n in rep.notes:
        print(f"note: {n}")
    damaged = base_model_problems(ws, store)  # the base model every state is replayed onto
    for p in damaged:
        print(f"PROBLEM: {p}")
    apart = divergences(ws, store, params)
    for p in apart:
        print(f"PROBLEM: {p}")
    if apart:
        print("(the lineage events are the truth: `kedit lineage repair` moves the other stores to them)")
    if rep.ok and not apart and not damaged:
        print("lineage OK")
        return 0
    for p in rep.problems:
        print(f"PROBLEM: {p}")
    return 1


def _seal(args) -> int:
    _, _, store = _store(args)
    ev = store.seal(by=_who(args), comment=args.comment)
    print(f"sealed the {ev.data['sealed_events']} events from before the event chain (event {ev.seq}, by "
          f"{_people([ev])}); chain head {ev.digest}")
    return 0


def _repair(args) -> int:
    from kedit.lineage import ops

    ws, params, store = _store(args)
    out = ops.repair(ws, store, params)
    for p in out["before"]:
        print(f"found: {p}")
    for d in out["done"]:
        print(f"done: {d}")
    for p in out["after"]:
        print(f"PROBLEM (left): {p}")
    if not out["before"]:
        print("nothing to repair: git, DVC, MLflow and CHAMPION follow the lineage events")
    return 1 if out["after"] else 0


def _gate(args) -> int:
    from kedit.lineage.gate import gate_state

    ws, _, store = _store(args)
    res = gate_state(ws, store, args.state, by=_who(args), mlflow=False if args.no_mlflow else None)
    from kedit.cli.tables import print_gate_checks

    print_gate_checks(res.checks)
    if res.failed_ids:
        print(f"  edits that did not take: {', '.join(map(str, res.failed_ids))}")
    if res.lost_ids:
        print(f"  earlier edits lost: {', '.join(map(str, res.lost_ids))}")
    against = res.parent[:12] if res.parent else "the base model"
    print(f"gate {'PASSED' if res.passed else 'FAILED'} for {res.state_id[:12]} against its parent {against} "
          f"(event {res.event_seq}): {res.report_dir / 'gate.md'}")
    if res.passed:
        print(f"next: read the report, then `kedit lineage approve {res.state_id[:12]}` and "
              f"`kedit lineage promote {res.state_id[:12]}`")
    return 0 if res.passed else 1


def _approve(args) -> int:
    from kedit.lineage import ops
    from kedit.lineage.shared import lock_wait, section

    ws = workspace(args)
    params = ops.lineage_params(ws)
    # a shared lineage (KEDIT_LOCK_URL / KEDIT_GIT_REMOTE): pull, record, publish under the cross-host lock
    with section(ws, f"approve {args.state[:12]}", params, wait_s=lock_wait(params)):
        ws, _, store = _store(args)
        ev = ops.approve(store, args.state, by=_who(args), comment=args.comment, ws=ws, key=args.key)
    check = store.promotion_check(ev.state)
    print(f"approved {ev.state[:12]} (event {ev.seq}, by {_people([ev])})")
    if not check.ok:
        print("not promotable yet: " + "; ".join(check.unmet))
    return 0


def _promote(args) -> int:
    from kedit.lineage import ops

    if args.force and not (args.reason or "").strip():
        raise CLIError("--force needs --reason WHY (recorded as an override event)")
    if args.reason and not args.force:
        raise CLIError("--reason is the reason for an override: give it with --force")
    ws, params, store = _store(args)
    mlflow, dvc = _follow(args, ws, params)
    out = ops.promote(ws, store, args.state, by=_who(args), comment=args.comment, mlflow=mlflow, dvc=dvc,
                      params=params, override=args.reason if args.force else None)
    _report("promoted", out)
    return 0


def _rollback(args) -> int:
    from kedit.lineage import ops

    ws, params, store = _store(args)
    mlflow, dvc = _follow(args, ws, params)
    out = ops.rollback(ws, store, args.state, by=_who(args), reason=args.reason, mlflow=mlflow, dvc=dvc,
                       params=params, force=args.force)
    _report("rolled back; champion is now", out)
    champ = out["champion"]
    if champ:
        es = store.editor_state(champ)
        print(f"editor state restored: {es.method}, {len(es.tensors)} tensors; the next nightly run continues "
              f"from {champ[:12]}")
    return 0


def _report(what: str, out: dict) -> None:
    champ = out.get("champion")
    if out.get("repaired"):
        print(out["repaired"])
    ev = out["event"]
    from kedit.lineage.text import escape_text

    print(f"{what} {champ[:12] if champ else 'base'} (event {ev['seq']}, by {escape_text(ev['by'])})")
    if ev["data"].get("override_event"):
        print(f"  OVERRIDE recorded (event {ev['data']['override_event']}): the promotion rules were not met")
    if "tag" in out:
        print(f"  git {out['git_commit'][:12]} tag {out['tag']}, DVC lineage rev {out.get('dvc_rev.lineage', '')}")
    if "registered_model" in out:
        print(f"  MLflow {out['registered_model']} version {out['version']} -> alias champion")


def _retract(args) -> int:
    from kedit.lineage.retract import RetractionImpossible, retract, write_request
    from kedit.models.store import load_model

    ws, _, store = _store(args)
    sid = store.resolve(args.state)
    lm = load_model(store.get(sid).base_model_slug, ws)
    try:
        new = retract(store, lm, sid, args.fact, by=args.by, reason=args.reason)
    except RetractionImpossible as exc:
        print(f"kedit retract: cannot retract: {exc}", file=sys.stderr)
        if exc.request is not None:
            path = write_request(exc.request, args.request_out or ws.root / "retractions"
                                 / f"{_safe(args.fact)}-edit-back.jsonl")
            print(f"wrote the edit back to {exc.request['target_new']!r} (the old object) to {path}", file=sys.stderr)
            print(f"apply it: kedit edit --method {exc.method} --requests {path} --out "
                  f"{ws.root / 'retractions' / (_safe(args.fact) + '-edit-back')}", file=sys.stderr)
            print("or append its line to the next feed file so the nightly refresh applies it", file=sys.stderr)
        return 2
    print(f"retracted fact {args.fact} from {sid[:12]}: new state {new.short} ({new.method}, parent {sid[:12]})")
    print(f"it is a candidate like any other: promoting it needs a passed gate verdict recorded against "
          f"{sid[:12]} and then `kedit lineage approve {new.short}`, `kedit lineage promote {new.short}`")
    print(f"gate it: kedit lineage gate {new.short}")
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _export(args) -> int:
    from kedit.lineage import ops

    ws, _, store = _store(args)
    if args.state == "base":
        sid = None
    elif args.state in ("champion", "@champion"):
        sid = store.champion()  # None after a rollback to the base model, or before any promotion
    else:
        sid = store.resolve(args.state)
    out = ops.export(ws, store, sid, args.out, force=args.force)
    remote = (out / "modeling_kedit_added.py").exists()  # added parameters ship their own code
    print(f"exported {'state ' + sid[:12] if sid else 'the base model'} to {out} (load with "
          f"AutoModelForCausalLM.from_pretrained{'(DIR, trust_remote_code=True)' if remote else ''})")
    return 0
