"""`kedit lineage log|show|diff|verify|promote`, `kedit rollback S`, `kedit export S --out DIR`."""

from __future__ import annotations

import getpass
import json
import os

from kedit.cli import workspace


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
    pr = s.add_parser("promote", help="make a state the champion (records who and why)")
    pr.add_argument("state")
    pr.add_argument("--by", default=None, help="who approves (default: $USER)")
    pr.add_argument("--comment", default="")
    _follow_flags(pr)
    pr.set_defaults(func=_promote)

    rb = sub.add_parser("rollback", help="make an earlier edit state (or 'base') the champion again")
    rb.add_argument("state", help="state id, unique prefix, or 'base'")
    rb.add_argument("--reason", required=True, help="why (kept in the lineage events)")
    rb.add_argument("--by", default=None, help="who (default: $USER)")
    _follow_flags(rb)
    rb.set_defaults(func=_rollback)

    ex = sub.add_parser("export", help="write a full HuggingFace model directory of an edit state")
    ex.add_argument("state", help="state id, unique prefix, or 'champion'")
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
        from kedit.cli import CLIError

        raise CLIError(f"no lineage store in {ws.lineage_dir} (nothing has been edited in this workspace)")
    return ws, params, open_store(ws, params)


def _who(args) -> str:
    return args.by or os.environ.get("USER") or getpass.getuser()


def _follow(args, ws, params) -> tuple[bool, bool]:
    from kedit.lineage.versioning import Versioning

    mlflow = not args.no_mlflow and bool(params.get("mlflow", True)) and (
        (ws.root / "mlflow.db").exists() or bool(os.environ.get("MLFLOW_TRACKING_URI")))
    dvc = not args.no_dvc and bool(params.get("dvc", True)) and Versioning(ws).initialised
    return mlflow, dvc


def _verdict(gate: dict | None) -> str:
    if not gate:
        return "gate: -"
    passed = gate.get("passed", gate.get("pass", gate.get("ok")))
    return "gate: PASS" if passed else ("gate: FAIL" if passed is not None else "gate: recorded")


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
                           "approvals": [a.to_dict() for a in e.approvals]} for e in entries], indent=2))
        return 0
    from rich.console import Console
    from rich.tree import Tree

    by_id = {e.state.id: e for e in entries}
    champ = store.champion()
    root = Tree(f"[bold]base model[/] {entries[0].state.base_model_slug if entries else ''}"
                + ("  [bold yellow]★ champion[/]" if entries and champ is None else ""))

    def label(e) -> str:
        s = e.state
        feed = s.feed.get("path") or s.feed.get("name") or str(s.feed.get("file_sha256", ""))[:12]
        who = ", ".join(sorted({a.by for a in e.approvals}))
        star = "[bold yellow]★ champion[/] " if e.champion else ""
        verdict = _verdict(e.gate)
        colour = "green" if "PASS" in verdict else ("red" if "FAIL" in verdict else "dim")
        return (f"{star}[cyan]{s.short}[/] {s.created_at}  {s.method}  feed {feed}  {s.n_edits} edits  "
                f"[{colour}]{verdict}[/]" + _drift_column(e.gate) + (f"  approved by {who}" if who else "")
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
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{(a or 'base')[:12]} -> {(b or 'base')[:12]}   common ancestor: "
          f"{(d['common_ancestor'] or 'base')[:12]}")
    print(f"facts added ({len(d['added'])}): {', '.join(d['added']) or '-'}")
    print(f"facts removed ({len(d['removed'])}): {', '.join(d['removed']) or '-'}")
    print(f"{'module':48s} {'||W_b - W_a||':>14s} {'||W_b||':>10s}")
    for n, v in d["modules"].items():
        print(f"{n:48s} {v['delta_norm']:14.6f} {v['weight_norm']:10.4f}")
    return 0


def _verify(args) -> int:
    from rich.progress import Progress

    _, _, store = _store(args)
    with Progress(transient=True) as prog:
        task = prog.add_task("replaying states", total=None)
        rep = store.verify(deep=not args.quick,
                           progress=lambda i, n: prog.update(task, completed=i, total=n))
    print(f"checked {rep.states} states, {rep.files} files, {rep.tensors} tensor hashes")
    if rep.ok:
        print("lineage OK")
        return 0
    for p in rep.problems:
        print(f"PROBLEM: {p}")
    return 1


def _promote(args) -> int:
    from kedit.lineage import ops

    ws, params, store = _store(args)
    mlflow, dvc = _follow(args, ws, params)
    out = ops.promote(ws, store, args.state, by=_who(args), comment=args.comment, mlflow=mlflow, dvc=dvc,
                      params=params)
    _report("promoted", out)
    return 0


def _rollback(args) -> int:
    from kedit.lineage import ops

    ws, params, store = _store(args)
    mlflow, dvc = _follow(args, ws, params)
    out = ops.rollback(ws, store, args.state, by=_who(args), reason=args.reason, mlflow=mlflow, dvc=dvc,
                       params=params)
    _report("rolled back; champion is now", out)
    champ = out["champion"]
    if champ:
        es = store.editor_state(champ)
        print(f"editor state restored: {es.method}, {len(es.tensors)} tensors; the next nightly run continues "
              f"from {champ[:12]}")
    return 0


def _report(what: str, out: dict) -> None:
    champ = out.get("champion")
    print(f"{what} {champ[:12] if champ else 'base'} (event {out['event']['seq']}, by {out['event']['by']})")
    if "tag" in out:
        print(f"  git {out['git_commit'][:12]} tag {out['tag']}, DVC lineage rev {out.get('dvc_rev.lineage', '')}")
    if "registered_model" in out:
        print(f"  MLflow {out['registered_model']} version {out['version']} -> alias champion")


def _export(args) -> int:
    from kedit.lineage import ops

    ws, _, store = _store(args)
    out = ops.export(ws, store, store.resolve(args.state), args.out, force=args.force)
    print(f"exported state {store.resolve(args.state)[:12]} to {out} (load with "
          f"AutoModelForCausalLM.from_pretrained)")
    return 0
