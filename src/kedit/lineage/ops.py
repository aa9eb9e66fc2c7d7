"""Operations that keep the three records in step: the lineage store (the truth), the MLflow
registry (aliases for serving and the UI) and git + DVC (files that travel). The CLI and the
nightly flow call these; the store alone is enough to roll back, the others follow when present.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from kedit.lineage.access import DEFAULTS, lineage_params, open_store, pending_report  # noqa: F401 (kept importable)
from kedit.lineage.identity import describe
from kedit.lineage.intent import Intent, adopt, clear_intent, read_intent, step_done, write_intent
from kedit.lineage.policy import refusal
from kedit.lineage.registry import model_name
from kedit.lineage.shared import DVC_REMOTE_ENV, lock_wait, section
from kedit.lineage.signing import signing_config
from kedit.lineage.state import BASE, Event, LineageError, label
from kedit.lineage.store import LineageStore, check_texts
from kedit.workspace import Workspace

log = logging.getLogger(__name__)


def _versioning(ws: Workspace, params: dict[str, Any]):
    from kedit.lineage.versioning import Versioning

    signing = signing_config(ws.root, params)  # its allowed signers file travels in the git history
    track = (str(signing.allowed_signers.relative_to(ws.root.resolve())),) if signing.on else ()
    return Versioning(ws, remote=os.environ.get(DVC_REMOTE_ENV) or params.get("dvc_remote"),
                      sign=bool(params.get("sign_commits", False)), track=track)


def _registry(ws: Workspace, slug: str, params: dict[str, Any]):
    from kedit.lineage.registry import ModelRegistry, Tracking

    return ModelRegistry(Tracking(ws), slug, prefix=params.get("model_prefix") or "")


def register_candidate(ws: Workspace, store: LineageStore, state_id: str, run_id: str | None = None,
                       params: dict[str, Any] | None = None) -> Any:
    """Register a committed state as a version of ``<prefix>-<slug>`` with the ``candidate`` alias."""
    params = params or lineage_params(ws)
    s = store.get(state_id)
    base_problem = base_model_problems(ws, store, [s.base_model_slug])
    if base_problem:
        raise LineageError(f"register state {s.short}: " + "; ".join(base_problem))
    v = _versioning(ws, params)
    git = v.git("rev-parse", "HEAD", check=False) if v.initialised else None
    return _registry(ws, s.base_model_slug, params).register(
        s, store.state_dir(s.id), run_id=run_id, dvc_rev=v.dvc_rev() if v.initialised else None, git_commit=git)


def base_model_problems(ws: Workspace, store: LineageStore, slugs: list[str] | None = None) -> list[str]:
    """Each base model the lineage edits (or ``slugs``), hashed in full against its manifest and compared
    with the hash the states recorded: what ``lineage verify``, registration and export rely on. A base
    model absent from the store is not checked (the lineage keeps the base tensors it edits)."""
    from kedit.models.store import MANIFEST, ModelCorruptError, verify_store_entry

    problems = []
    bases = _bases(store)
    for slug in (slugs if slugs is not None else sorted(bases)):
        if not (ws.model_dir(slug) / MANIFEST).exists():
            continue
        try:
            manifest = verify_store_entry(ws, slug)
        except ModelCorruptError as exc:
            problems.append(str(exc))
            continue
        if slug in bases and manifest.model_hash != bases[slug]:
            problems.append(f"base model {slug!r}: models/{slug} has hash {manifest.model_hash[:12]}, the lineage's "
                            f"states were made from {bases[slug][:12]}")
    return problems


# --- promote / rollback: one lock, an intent record, then store event -> git + DVC -> MLflow ---------
PAUSE_ENV = "KEDIT_TEST_PAUSE_AT"  # test hook: sleep after a named step so a test can kill -9 the process


def _pause(step: str) -> None:
    if os.environ.get(PAUSE_ENV) == step:
        print(f"kedit: paused after step {step!r} ({PAUSE_ENV}), pid {os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(3600)


def stores_present(ws: Workspace, params: dict[str, Any]) -> tuple[bool, bool]:
    """Whether this workspace has an MLflow store (``mlflow.db`` or ``$MLFLOW_TRACKING_URI``) and a git +
    DVC repository for a promotion to move, each also enabled in params.yaml."""
    from kedit.lineage.versioning import Versioning

    mlflow = bool(params.get("mlflow", True)) and (
        (ws.root / "mlflow.db").exists() or bool(os.environ.get("MLFLOW_TRACKING_URI")))
    dvc = bool(params.get("dvc", True)) and Versioning(ws).initialised
    return mlflow, dvc


def _message(ev: Event) -> str:
    """The git commit message of a promotion / rollback; ``[kedit event N]`` ties the commit to the event."""
    what = "promote state" if ev.type == "promote" else "rollback to state"
    chain = f" [kedit chain {ev.digest}]" if ev.digest else ""  # the event chain's head: a signed commit seals it
    return f"kedit: {what} {label(ev.state)[:12]} [kedit event {ev.seq}]{chain} ({ev.by}: {ev.comment})"


def _bases(store: LineageStore) -> dict[str, str]:
    """Base model slug -> hash of the lineage's states (the latest state's hash per slug)."""
    return {s.base_model_slug: s.base_model_hash for s in store.states()}


def _move_champion_alias(ws: Workspace, store: LineageStore, target: str | None, params: dict[str, Any],
                         dvc_rev: str | None, git_commit: str | None) -> dict[str, Any]:
    """Point MLflow's ``champion`` alias at ``target``'s version (registered if missing), or at the base
    model's version for ``target=None`` (registered on first use; see ModelRegistry.register_base)."""
    if target:
        s = store.get(target)
        reg = _registry(ws, s.base_model_slug, params)
        if reg.version_of(s.id) is None:
            reg.register(s, store.state_dir(s.id), dvc_rev=dvc_rev, git_commit=git_commit)
        elif git_commit:
            reg._tag(reg.version_of(s.id).version, dvc_rev, git_commit)
        mv = reg.set_alias("champion", s.id)
        reg.clear_alias("candidate", s.id)  # promoted: no longer a candidate
        return {"registered_model": reg.name, "version": str(mv.version)}
    out: dict[str, Any] = {}
    for slug, base_hash in _bases(store).items():
        reg = _registry(ws, slug, params)
        mv = reg.register_base(slug, base_hash)
        reg.set_alias_version("champion", mv.version)
        out = {"registered_model": reg.name, "version": str(mv.version)}
    return out


def _follow(ws: Workspace, store: LineageStore, intent: Intent, params: dict[str, Any]) -> dict[str, Any]:
    """The steps after the store event, each recorded in the intent when it finishes; then the intent goes."""
    from kedit.lineage.versioning import state_tag

    ev = next(e for e in store.events() if e.seq == intent.out["event_seq"])
    if "report" not in intent.done:
        if ev.data.get("override_event"):
            _note_override(ws, store, ev)  # idempotent: a repair after a kill writes it once
        step_done(store.root, intent, "report")
        _pause("report")
    if intent.dvc and "versioning" not in intent.done:
        from kedit.lineage.registry import gate_of
        from kedit.lineage.versioning import write_champion_metrics

        target = store.get(intent.target) if intent.target else None
        write_champion_metrics(ws.root, intent.target, gate_of(store, intent.target) if target else None,
                               n_edits=sum(s.n_edits for s in store.path(target.id)) if target else 0)
        info = _versioning(ws, params).tag_state(label(intent.target), _message(ev))
        step_done(store.root, intent, "versioning", **info, tag=state_tag(label(intent.target)))
        _pause("versioning")
    if intent.mlflow and "mlflow" not in intent.done:
        moved = _move_champion_alias(ws, store, intent.target, params, intent.out.get("dvc_rev.lineage"),
                                     intent.out.get("git_commit"))
        step_done(store.root, intent, "mlflow", **moved)
    clear_intent(store.root)
    return {"champion": intent.target, **{k: v for k, v in intent.out.items() if k != "event_seq"}}


def _sync_intent(store: LineageStore, mlflow: bool, dvc: bool) -> Intent | None:
    """An intent that brings git + DVC and MLflow to the store's current champion (None: never promoted)."""
    ev = store.champion_event()
    if ev is None:
        return None
    intent = Intent(op=ev.type, target=ev.state, by=ev.by, mlflow=mlflow, dvc=dvc, done=["event"],
                    out={"event_seq": ev.seq})
    write_intent(store.root, intent)  # a repair killed halfway is itself finished by the next command
    return intent


def finish_pending(ws: Workspace, store: LineageStore, params: dict[str, Any]) -> str | None:
    """Complete or drop what an interrupted promote / rollback left (call with the store locked).

    Event not recorded: nothing had changed; the intent is dropped. Event recorded: git + DVC and
    MLflow are brought to the store's champion (the truth), with the steps the intent had chosen."""
    intent = read_intent(store.root)
    if intent is None:
        return None
    recorded = next((e for e in store.events()
                     if e.type in ("promote", "rollback") and e.data.get("intent") == intent.id), None)
    if recorded is None:
        clear_intent(store.root)
        note = f"dropped an interrupted {intent.describe()}: it stopped before its event was recorded, nothing changed"
        log.warning(note)
        return note
    store.write_champion_file()
    latest = store.champion_event()
    if latest is not None and latest.seq == recorded.seq:
        adopt(store.root, intent)
        _follow(ws, store, intent, params)  # the steps it had not finished
    else:  # the champion moved since (through the store API alone): follow the store, not the old intent
        sync = _sync_intent(store, intent.mlflow, intent.dvc)
        if sync is not None:
            _follow(ws, store, sync, params)
    note = f"finished an interrupted {intent.describe()}"
    log.warning(note)
    return note


def promote(ws: Workspace, store: LineageStore, state_id: str, by: str, comment: str = "",
            mlflow: bool = True, dvc: bool = True, params: dict[str, Any] | None = None,
            override: str | None = None) -> dict[str, Any]:
    """Champion becomes ``state_id``: the store event, a git commit + tag, the MLflow ``champion`` alias.

    The one way kedit promotes (CLI, Prefect flows and tasks, the nightly decide step): the rules of
    :mod:`kedit.lineage.policy` (a passed gate for this state against its parent, then an approval)
    or ``override`` (a reason, recorded as an override event and noted in the gate report). One lock
    is held over every store; an intent record makes a crash between them resumable."""
    params = params or lineage_params(ws)
    mlflow, dvc = mlflow and bool(params.get("mlflow", True)), dvc and bool(params.get("dvc", True))
    check_texts("promote", by, comment, reason=override)
    op = f"promote {state_id[:12]} by {by}"
    with section(ws, op, params, wait_s=lock_wait(params)), store.lock(op):
        repaired = finish_pending(ws, store, params)
        sid = store.resolve(state_id)
        if not store.signing.on:  # a store opened without params.yaml's setting: the setting still holds
            store.signing = signing_config(ws.root, params)
        check = store.promotion_check(sid, by=by, distinct=store.require_distinct_approver
                                      or bool(params.get("require_distinct_approver", False)))
        if not check.ok and not (override or "").strip():
            raise refusal("promote", sid, check)
        if dvc:  # refused before the event, so a refusal leaves nothing to repair
            _versioning(ws, params).check_data()
        intent = Intent(op="promote", target=sid, by=by, mlflow=mlflow, dvc=dvc)
        write_intent(store.root, intent)
        ev = store.promote(sid, by=by, comment=comment, override=override, data={"intent": intent.id})
        step_done(store.root, intent, "event", event_seq=ev.seq)
        _pause("event")
        out = _follow(ws, store, intent, params)
    return {"event": ev.to_dict(), **out, **({"repaired": repaired} if repaired else {})}


def rollback(ws: Workspace, store: LineageStore, state_id: str | None, by: str, reason: str,
             mlflow: bool = True, dvc: bool = True, params: dict[str, Any] | None = None,
             force: bool = False) -> dict[str, Any]:
    """Champion becomes an earlier state (``None`` or ``base``: the base model) in every store: the
    event, a git commit + tag (``kedit/state/base`` for the base model) and the MLflow alias (for the
    base model: a version standing for it). The next nightly run continues from it with its editor
    state. A target that was never champion (nor an ancestor of one) needs ``force``, recorded as an
    override with ``reason``."""
    params = params or lineage_params(ws)
    mlflow, dvc = mlflow and bool(params.get("mlflow", True)), dvc and bool(params.get("dvc", True))
    if not reason or not reason.strip():
        raise ValueError("rollback: give a reason")
    check_texts("rollback", by, reason=reason)
    op = f"rollback {label(state_id)[:12]} by {by}"
    with section(ws, op, params, wait_s=lock_wait(params)), store.lock(op):
        repaired = finish_pending(ws, store, params)
        sid = None if state_id in (None, BASE) else store.resolve(state_id)
        check = store.rollback_check(sid)
        if not check.ok and not force:
            raise refusal("rollback to", sid, check)
        if dvc:  # refused before the event, so a refusal leaves nothing to repair
            _versioning(ws, params).check_data()
        intent = Intent(op="rollback", target=sid, by=by, mlflow=mlflow, dvc=dvc)
        write_intent(store.root, intent)
        ev = store.rollback(sid, by=by, reason=reason, override=force, data={"intent": intent.id})
        step_done(store.root, intent, "event", event_seq=ev.seq)
        _pause("event")
        out = _follow(ws, store, intent, params)
    return {"event": ev.to_dict(), **out, **({"repaired": repaired} if repaired else {})}


def approve(store: LineageStore, state_id: str, by: str, comment: str = "", ws: Workspace | None = None,
            key: str | Path | None = None) -> Event:
    """Record an approval of ``state_id`` (what a promotion needs after a passed gate); with ``ws``, the
    approval also goes onto the state's MLflow model version (who, when, why: see
    :meth:`kedit.lineage.registry.ModelRegistry.record_review`). Signed with the approver's SSH ``key``
    when ``lineage.approval_signing`` is on (see :meth:`LineageStore.approve`)."""
    sid = store.resolve(state_id)
    reg = _review_registry(ws, store, sid) if ws is not None else None  # a store that is down: fail first
    ev = store.approve(sid, by=by, comment=comment, key=key)
    if reg is not None:
        reg.record_review(sid, "approved", ev.by, ev.at, ev.comment)
    return ev


def reject(ws: Workspace, store: LineageStore, state_id: str, by: str, comment: str = "") -> Event:
    """Record that a candidate is not promoted, in the lineage and on its MLflow model version (which
    loses the ``candidate`` alias); the champion does not move."""
    sid = store.resolve(state_id)
    reg = _review_registry(ws, store, sid)  # an MLflow server that is down fails here, before any change
    ev = store.reject(sid, by=by, comment=comment)
    if reg is not None:
        reg.record_review(sid, "rejected", ev.by, ev.at, ev.comment)
    return ev


def _review_registry(ws: Workspace, store: LineageStore, state_id: str, params: dict[str, Any] | None = None):
    """The registry a review of ``state_id`` is mirrored to (None: no MLflow store in this workspace)."""
    params = params or lineage_params(ws)
    if not stores_present(ws, params)[0]:
        return None
    return _registry(ws, store.get(state_id).base_model_slug, params)


def divergences(ws: Workspace, store: LineageStore, params: dict[str, Any] | None = None) -> list[str]:
    """Where git + DVC, MLflow or the CHAMPION copy disagree with the lineage events (the truth)."""
    from kedit.lineage.versioning import Versioning, state_tag

    params = params or lineage_params(ws)
    problems = [p for p in (pending_report(store), store.champion_file_problem()) if p]
    ev = store.champion_event()
    if ev is None:
        return problems
    mlflow, dvc = stores_present(ws, params)
    want = label(ev.state)
    if dvc:
        tag = state_tag(want)
        v = Versioning(ws)
        msg = v.tag_message(tag)
        if msg is None or f"[kedit event {ev.seq}]" not in msg:
            problems.append(f"git: tag {tag} {'is missing' if msg is None else 'points at an older commit'}; the "
                            f"{ev.type} of {want[:12]} (event {ev.seq}) has no git commit")
        elif params.get("sign_commits"):
            why = v.verify_commit(tag)
            if why:
                problems.append(f"git: the commit of tag {tag} (event {ev.seq}) has no good signature "
                                f"(lineage.sign_commits): {why}")
        problems.extend(_chain_against_git(store, v))
    if mlflow:
        slugs = [store.get(ev.state).base_model_slug] if ev.state else list(_bases(store))
        for slug in slugs:
            name = model_name(slug, params.get("model_prefix") or "")
            have = _alias_state(ws, name)
            if have != want:
                problems.append(f"MLflow: {name}@champion is {(have or 'not set')[:12]}, the lineage champion is "
                                f"{want[:12]} (event {ev.seq})")
    return problems


def _chain_against_git(store: LineageStore, v: Any) -> list[str]:
    """Each promotion's git commit names the chain digest of its event: an event whose digest differs
    now was rewritten after that commit (the chain recomputed over an edit, which the chain alone
    cannot show; with signed commits the writer cannot rewrite these records too)."""
    digests = {e.seq: e.digest for e in store.events()}
    out = []
    for commit, seq, digest in v.chain_marks():
        have = digests.get(seq)
        if have != digest:
            out.append(f"events: git commit {commit[:12]} recorded event {seq} with chain digest {digest[:12]}, the event "
                       f"{'is gone' if seq not in digests else f'now has {str(have)[:12]}'}: the events up to "
                       f"{seq} were rewritten after that commit")
    return out


def _alias_state(ws: Workspace, name: str, alias: str = "champion") -> str | None:
    """The state tag of the version ``name@alias`` points at (None: no such model or alias). Read-only."""
    from kedit.lineage.registry import TAG_STATE, import_mlflow

    import_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(ws.mlflow_uri).get_model_version_by_alias(name, alias).tags.get(TAG_STATE)
    except MlflowException:
        return None


def repair(ws: Workspace, store: LineageStore, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bring every store to the lineage events: finish or drop an interrupted promote / rollback,
    rewrite the CHAMPION copy, and move git + DVC and the MLflow alias where they disagree."""
    params = params or lineage_params(ws)
    with section(ws, "repair", params, wait_s=lock_wait(params)), store.lock("repair"):
        before = divergences(ws, store, params)
        done = [n for n in [finish_pending(ws, store, params)] if n]
        store.write_champion_file()
        left = divergences(ws, store, params)
        if any(p.startswith(("git:", "MLflow:")) for p in left):
            mlflow, dvc = stores_present(ws, params)
            intent = _sync_intent(store, mlflow, dvc)
            if intent is not None:
                _follow(ws, store, intent, params)
                done.append(f"moved git + DVC and MLflow to the champion {label(intent.target)[:12]}")
        after = divergences(ws, store, params)
    return {"before": before, "done": done, "after": after}


def _note_override(ws: Workspace, store: LineageStore, ev: Event) -> None:
    """Append the override to the gate report the state's verdict came from (gate.md + override.json);
    a step of the promotion (its intent's ``report``), so a repair after a kill writes it, once."""
    from kedit.atomic import write_json_atomic, write_text_atomic

    over = next((e for e in store.events() if e.seq == ev.data.get("override_event")), None)
    gates = [e for e in store.events() if e.type == "gate" and e.state == ev.state and e.data.get("report")]
    if over is None or not gates:
        return
    report = ws.path(gates[-1].data["report"])  # relative to the workspace (absolute: an older record)
    if not report.is_dir():
        return
    who = describe(over.actor)
    note = (f"\n## Override\n\nPromoted on {over.at} by {over.by} ({who}) **despite unmet promotion rules**:\n\n"
            + "".join(f"- {u}\n" for u in over.data.get("unmet", [])) + f"\nReason given: {over.comment}\n"
            f"(lineage events {over.seq} override, {ev.seq} promote)\n")
    md = report / "gate.md"
    text = md.read_text() if md.exists() else ""
    if f"(lineage events {over.seq} override, {ev.seq} promote)" not in text:
        write_text_atomic(md, text + note)
    write_json_atomic(report / "override.json", over.to_dict())


def export(ws: Workspace, store: LineageStore, state_id: str | None, out_dir: str | Path,
           force: bool = False) -> Path:
    """Write a HuggingFace model directory of ``state_id`` (base model + replayed deltas) for serving;
    ``None``: the base model the lineage edits (what ``champion`` is after a rollback to base). A state
    that adds parameters (T-Patcher, memory) also ships its code: see :mod:`kedit.export`."""
    import tempfile
    from dataclasses import asdict

    from kedit.atomic import make_readable, write_json_atomic
    from kedit.export import added_parameters, save_with_added
    from kedit.models.store import load_model
    from kedit.safepath import check_target

    out = check_target(out_dir, ws, "export --out")  # no link, not the workspace or one of its stores
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    s = store.get(state_id) if state_id else None
    if s is not None:
        slug, base_hash = s.base_model_slug, s.base_model_hash
    else:
        bases = _bases(store)
        if len(bases) != 1:
            raise LineageError(f"export base: the lineage edits {len(bases)} base models ({sorted(bases)}); "
                               f"the base model itself is in models/<slug>/")
        ((slug, base_hash),) = bases.items()
    lm = load_model(slug, ws, verify=True)  # every file against its sha256: never ship a damaged base
    if lm.manifest.model_hash != base_hash:
        raise LineageError(f"export: models/{slug} has hash {lm.manifest.model_hash[:12]}, the lineage "
                           f"{'state ' + s.short if s else 'base'} is {base_hash[:12]}")
    editor_state = store.materialise(s.id if s else None, lm)
    added = added_parameters(lm, editor_state)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a fresh folder beside ``out`` (never a fixed name a link could stand in for), removed on any failure
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".exporting", dir=out.parent))
    old = None
    try:
        if added is None:
            lm.model.save_pretrained(tmp)
        else:  # added parameters: the directory ships its own code (load with trust_remote_code=True)
            save_with_added(lm, added, tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "kedit_state.json",
                          {"state": s.to_dict() if s else None, "base_model": asdict(lm.manifest)})
        make_readable(tmp)
        if out.exists():  # moved aside, not deleted, until the new directory is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".replaced", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def render_show(store: LineageStore, state_id: str) -> str:
    """A state's record and its events as indented JSON (``kedit lineage show``)."""
    s = store.get(state_id)
    evs = [e.to_dict() for e in store.events() if e.state == s.id]
    check = store.promotion_check(s.id)
    return json.dumps({"state": s.to_dict(), "events": evs, "champion": store.champion() == s.id,
                       "children": [c.id for c in store.children(s.id)],
                       "promotion": {"allowed": check.ok, "unmet": check.unmet, "gate_event": check.gate_event,
                                     "approval_event": check.approval_event}}, indent=2, sort_keys=True)
