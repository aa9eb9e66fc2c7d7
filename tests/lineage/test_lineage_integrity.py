"""Integrity under hostile conditions (issue 38, part A): two writers after a crash, forged and edited
events, terminal control characters in names and reasons, the override record after a kill, and
one account approving and promoting."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kedit.lineage import LineageError, LineageStore, ops
from kedit.lineage.chain import GENESIS, seal
from kedit.lineage.intent import read_intent
from kedit.lineage.policy import PromotionRefused

OFF = {"mlflow": False, "dvc": False, "snapshot_every": 20, "model_prefix": "kedit", "dvc_remote": None}
DEAD_PID = 2**22 + 12345  # above Linux's largest pid_max: never a live process


def _stale_lock(root: Path) -> None:
    """What a writer killed with -9 leaves: the lock file naming a pid that is gone."""
    root.mkdir(parents=True, exist_ok=True)
    (root / ".lock").write_text(json.dumps({"pid": DEAD_PID, "host": os.uname().nodename, "since": "then",
                                            "op": "promote (killed)"}))


def _writer(root: str, start, tried, i: int, results) -> None:
    """One writer of the race: take the lock at the ``start`` barrier; the winner holds it until both have
    tried (the ``tried`` barrier), then records a rollback."""
    store = LineageStore(root)
    try:
        start.wait()
        with store.lock(f"race {i}"):
            tried.wait(60)  # both are in here if both took the stale lock over
            ev = store.rollback(None, by=f"writer{i}", reason="race")
        results.put(("won", os.getpid(), ev.seq))
    except LineageError as exc:
        tried.wait(60)
        results.put(("refused", os.getpid(), str(exc)))


def test_two_writers_after_a_crash_exactly_one_wins(tmp_path):
    """Issue 38.1: both writers took a stale lock over and both wrote (one event overwritten). Three
    writers per round, eight rounds: the old O_EXCL takeover let two of them in in 2-4 rounds of 8."""
    ctx = mp.get_context("fork")
    root = tmp_path / "lineage"
    wins = 0
    for _ in range(8):
        _stale_lock(root)
        start, tried, results = ctx.Barrier(3), ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(str(root), start, tried, i, results)) for i in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        got = sorted(results.get(timeout=10) for _ in procs)
        assert [g[0] for g in got] == ["refused", "refused", "won"], got
        winner = got[2][1]
        assert all(f"locked by pid {winner} " in g[2] and "race" in g[2] for g in got[:2]), got  # losers name it
        wins += 1
    store = LineageStore(root)
    files = sorted(p.name for p in store.events_dir.glob("*.json"))
    seqs = [e.seq for e in store.events()]
    assert len(files) == wins and seqs == list(range(1, wins + 1)), files  # no number written twice
    assert store.chain().problems == [] and store.lock_holder() == {}


def test_an_event_number_is_never_written_twice(tmp_path, monkeypatch):
    """A writer that read the events before another wrote (what a failed lock would allow) is refused,
    and the event already written stays as it was."""
    store, other = LineageStore(tmp_path / "lineage"), LineageStore(tmp_path / "lineage")
    stale = other.chain()  # other read the (empty) events here
    first = store.rollback(None, by="alice", reason="first")
    monkeypatch.setattr(other, "chain", lambda: stale)
    with pytest.raises(LineageError, match="event 1 exists already"):
        other.rollback(None, by="bob", reason="second")
    (ev,) = store.events()
    assert ev == first and ev.by == "alice" and not list(store.events_dir.glob(".*.tmp"))


def test_forged_approval_is_named_by_verify_and_refused_by_promote(workspace, stored_lm, capsys, run_batches,
                                                                   gate_and_approve, forge_event):
    """Issue 38.4: a hand-written gate.json (passed) and approve.json passed verify and let promote make
    the state champion."""
    from kedit.cli import main

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    actor = {"identity": "alice", "os_user": "alice", "uid": 1000, "host": "h", "pid": 1, "configured": False}
    base = {"state": s1.id, "by": "alice", "at": "2026-12-01T00:00:00Z", "comment": "", "actor": actor}
    forge_event(store, "gate.json", {**base, "seq": 1, "type": "gate", "data": {"gate": {"passed": True}, "against": None}})
    forge_event(store, "approve.json", {**base, "seq": 2, "type": "approve", "data": {}})
    w = ["-w", str(workspace.root)]

    assert main([*w, "lineage", "verify", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "gate.json): its file name does not match" in out and "approve.json): its file name does not match" in out
    with pytest.raises(PromotionRefused, match="approve.json\\) is not trusted"):
        ops.promote(workspace, store, s1.id, by="alice", params=OFF)
    assert store.champion() is None

    # named like kedit names them, in a store with chained events: no chain fields
    for p in store.events_dir.glob("*.json"):
        p.unlink()
    store.reject(s1.id, by="bob", comment="not yet")  # event 1, chained
    forge_event(store, "000002-gate.json", {**base, "seq": 2, "type": "gate", "data": {"gate": {"passed": True},
                                                                                 "against": None}})
    forge_event(store, "000003-approve.json", {**base, "seq": 3, "type": "approve", "data": {}})
    rep = store.verify(deep=False)
    assert any("event 2 (gate, 000002-gate.json): it has no chain fields" in p for p in rep.problems), rep.problems
    assert any("event 3 (approve, 000003-approve.json): it has no chain fields" in p for p in rep.problems)
    assert main([*w, "lineage", "promote", s1.id[:12], "--by", "alice"]) == 2
    assert "not trusted" in capsys.readouterr().err and store.champion() is None

    # with chain fields computed the way kedit does, but a gate verdict not bound to the state's record
    for name in ("000002-gate.json", "000003-approve.json"):
        (store.events_dir / name).unlink()
    head = store.chain().head
    gate = seal({**base, "seq": 2, "type": "gate", "data": {"gate": {"passed": True}, "against": None}}, head)
    forge_event(store, "000002-gate.json", gate)
    forge_event(store, "000003-approve.json", seal({**base, "seq": 3, "type": "approve", "data": {}}, gate["digest"]))
    assert store.chain().problems == []  # the chain alone cannot tell (docs/lineage.md: it has no secret)
    assert any("not bound to the state's record" in p for p in store.verify(deep=False).problems)
    with pytest.raises(PromotionRefused, match="not bound"):
        store.promote(s1.id, by="alice")
    # a real verdict and approval after them do not promote while the forged events stand
    gate_and_approve(store, s1)
    with pytest.raises(PromotionRefused, match="the lineage events fail their check.*000002-gate.json"):
        ops.promote(workspace, store, s1.id, by="alice", params=OFF)
    # ... once the forged events are gone (here with the two real ones after them), they do
    for p in sorted(store.events_dir.glob("*.json"))[1:]:
        p.unlink()
    gate_and_approve(store, s1)
    ops.promote(workspace, store, s1.id, by="alice", params=OFF)
    assert store.champion() == s1.id


@pytest.fixture
def forge_gate_and_approval(forge_event):
    """``forge_gate_and_approval(...)``: _forge_gate_and_approval writing its events with ``forge_event``."""
    return lambda *a, **k: _forge_gate_and_approval(*a, **k, forge=forge_event)


def _forge_gate_and_approval(store: LineageStore, state_id: str, *, forge) -> tuple[Path, Path]:
    """Case 4c of issue 38: a gate verdict and an approval chained with kedit's own public ``seal`` (the
    verdict not bound to the state's record), appended to the events."""
    actor = {"identity": "alice", "os_user": "alice", "uid": 1000, "host": "h", "pid": 1, "configured": False}
    base = {"state": state_id, "by": "alice", "at": "2026-12-01T00:00:00Z", "comment": "", "actor": actor}
    chain = store.chain()
    seq = chain.last_seq + 1
    gate = seal({**base, "seq": seq, "type": "gate", "data": {"gate": {"passed": True}, "against": None}},
                chain.head)
    g = forge(store, f"{seq:06d}-gate.json", gate)
    a = forge(store, f"{seq + 1:06d}-approve.json", seal({**base, "seq": seq + 1, "type": "approve",
                                                           "data": {}},
                                                         gate["digest"]))
    return g, a


def test_promote_refuses_while_verify_names_a_forged_event(workspace, stored_lm, capsys, run_batches,
                                                           gate_and_approve, forge_gate_and_approval):
    """Issue 38.4, case 4c: with a forged gate + approval, verify named the forged gate but promote went
    ahead (it ignored the gate, used the state's earlier real verdict and counted the forged approval).
    Now any problem verify finds in the events refuses a promotion, naming the event file and why."""
    from kedit.cli import main

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    s1, s2 = run_batches(store, lm, 2)
    gate_and_approve(store, s1)
    ops.promote(workspace, store, s1.id, by="bob", params=OFF)
    store.record_gate(s2.id, {"passed": True}, against=s1.id)  # s2's real verdict: passed, not approved
    gate, approval = forge_gate_and_approval(store, s2.id)
    w = ["-w", str(workspace.root)]
    assert main([*w, "lineage", "verify", "--quick"]) == 1
    assert f"(gate, {gate.name}): the gate verdict is not bound to the state's record" in capsys.readouterr().out
    assert store.chain().problems == []  # the chain alone cannot tell; the binding check does
    with pytest.raises(PromotionRefused, match=f"fail their check.*{gate.name}.*not bound"):
        ops.promote(workspace, store, s2.id, by="mallory", params=OFF)
    assert main([*w, "lineage", "promote", s2.id[:12], "--by", "mallory", "--no-mlflow", "--no-dvc"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"event {int(gate.name[:6])} (gate, {gate.name}): the gate verdict is not bound" in err, err
    assert "kedit lineage verify" in err and "move the named files out" in err
    assert store.champion() == s1.id

    # a problem anywhere in the events refuses, not only in the promoted state's: a forged gate for s1
    gate.unlink(), approval.unlink()
    store.approve(s2.id, by="alice")
    assert store.promotion_check(s2.id).ok
    other, other_approval = forge_gate_and_approval(store, s1.id)
    other_approval.unlink()
    with pytest.raises(PromotionRefused, match=f"fail their check.*{other.name}"):
        ops.promote(workspace, store, s2.id, by="bob", params=OFF)
    # an override goes past it, recorded with the problem it went past
    out = ops.promote(workspace, store, s2.id, by="bob", params=OFF,
                      override="forged gate moved to evidence/")
    over = next(e for e in store.events() if e.seq == out["event"]["data"]["override_event"])
    assert any(other.name in u for u in over.data["unmet"]) and store.champion() == s2.id
    # rollback is not held by the rule (it only goes back, and is how a bad promotion is undone)
    ops.rollback(workspace, store, s1.id, by="bob", reason="undo while investigating", params=OFF)
    assert store.champion() == s1.id and store.event_problems()


def test_edited_event_is_named_and_does_not_count(workspace, stored_lm, tmp_path, run_batches):
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    report = tmp_path / "report"
    report.mkdir()
    (report / "gate.json").write_text(json.dumps({"passed": False}))
    g = store.record_gate(s1.id, {"passed": False}, against=None, report=str(report))
    store.approve(s1.id, by="alice")
    path = store.events_dir / g.file
    raw = json.loads(path.read_text())
    raw["data"]["gate"]["passed"] = True  # the verdict flipped by hand
    path.write_text(json.dumps(raw))
    assert any(f"event {g.seq} (gate, {g.file}): its content does not match its digest" in p
               for p in store.verify(deep=False).problems)
    with pytest.raises(PromotionRefused, match="does not match its digest"):
        store.promote(s1.id, by="alice")

    # ... and with its own digest recomputed: the next event no longer follows it
    path.write_text(json.dumps(seal(raw, raw["prev"])))
    assert any("event 2 (approve" in p and "does not follow event 1" in p for p in store.verify(deep=False).problems)
    with pytest.raises(PromotionRefused, match="no approval"):
        store.promote(s1.id, by="alice")

    # a verdict whose report was changed afterwards, or whose state record was
    for p in store.events_dir.glob("*.json"):
        p.unlink()
    (report / "gate.json").write_text(json.dumps({"passed": True}))
    store.record_gate(s1.id, {"passed": True}, against=None, report=str(report))
    store.approve(s1.id, by="alice")
    assert store.promotion_check(s1.id).ok
    (report / "gate.json").write_text(json.dumps({"passed": True, "note": "edited"}))
    assert "changed since the verdict was recorded" in " ".join(store.promotion_check(s1.id).unmet)
    (report / "gate.json").write_text(json.dumps({"passed": True}))
    assert store.promotion_check(s1.id).ok
    shutil.rmtree(report)  # a copy of the workspace by git + DVC: reports/ is not versioned
    assert store.promotion_check(s1.id).ok and store.verify(deep=False).ok


def test_events_from_before_the_chain_load_and_count_once_sealed(workspace, stored_lm, capsys, run_batches,
                                                                 gate_and_approve, forge_event):
    """An existing workspace: its events have no chain fields. The champion is read from them as before;
    their verdicts and approvals count for a promotion once `kedit lineage seal` vouched for them."""
    from kedit.cli import main

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    s1, s2 = run_batches(store, lm, 2)
    gate_and_approve(store, s1)
    store.promote(s1.id, by="alice")
    gate_and_approve(store, s2)
    for p in store.events_dir.glob("*.json"):  # as an older kedit wrote them
        raw = json.loads(p.read_text())
        raw.pop("prev"), raw.pop("digest")
        raw["data"].pop("binding", None)
        p.write_text(json.dumps(raw))
    assert store.champion() == s1.id and store.chain().legacy == 5
    w = ["-w", str(workspace.root)]
    assert main([*w, "lineage", "verify", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "note: 5 events were written before the event chain" in out and "lineage OK" in out
    assert "kedit lineage seal" in " ".join(store.promotion_check(s2.id).unmet)
    forged = forge_event(store, "000006-seal.json", {"seq": 6, "type": "seal", "state": None, "by": "mallory", "at": "t",
                                                "data": {}})  # an old-style seal proves nothing
    assert "kedit lineage seal" in " ".join(store.promotion_check(s2.id).unmet)
    forged.unlink()
    assert main([*w, "lineage", "seal", "--by", "carol"]) == 0
    assert "sealed the 5 events" in capsys.readouterr().out
    assert store.promotion_check(s2.id).ok
    assert main([*w, "lineage", "verify", "--quick"]) == 0
    assert "event 6 (seal by carol) vouched for them" in capsys.readouterr().out
    # the seal chains over them: editing one now is named
    first = store.events_dir / "000001-gate.json"
    first.write_text(first.read_text().replace('"passed": true', '"passed": false'))
    assert any("event 6 (seal" in p and "does not follow event 5" in p for p in store.verify(deep=False).problems)
    assert "kedit lineage seal" in " ".join(store.promotion_check(s2.id).unmet)  # the seal no longer counts


def test_control_characters_are_refused_and_escaped(workspace, stored_lm, capsys, run_batches, forge_event):
    """Issue 38.6: --by / --reason took terminal escape sequences that `lineage log` printed raw."""
    from kedit.cli import main

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    w = ["-w", str(workspace.root)]
    assert main([*w, "lineage", "approve", s1.id[:12], "--by", "mallory\x1b[2K\ralice"]) == 2
    err = capsys.readouterr().err
    assert "approve: by: control character \\x1b at position 7" in err
    assert main([*w, "rollback", "base", "--reason", "ok\x1b]0;pwned\x07", "--by", "bob"]) == 2
    assert "rollback: reason: control character \\x1b" in capsys.readouterr().err
    with pytest.raises(ValueError, match="comment: control character"):
        store.approve(s1.id, by="alice", comment="fine\u202eenil")
    assert store.events() == []
    store.approve(s1.id, by="alice", comment="two\nlines\tand a tab")  # newlines and tabs are text

    # a record written before the check (by an older kedit, no chain fields): shown escaped, never raw
    for p in store.events_dir.glob("*.json"):
        p.unlink()
    actor = {"identity": "eve\x1b]0;x\x07", "os_user": "eve", "uid": 1, "host": "h", "pid": 1, "configured": True}
    forge_event(store, "000001-approve.json", {"seq": 1, "type": "approve", "state": s1.id, "by": "eve\x1b[31m",
                                          "at": "t", "comment": "", "data": {}, "actor": actor})
    assert main([*w, "lineage", "log"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b" in out


def test_override_report_is_written_by_the_repair_after_a_kill(workspace, stored_lm, tmp_path, run_batches,
                                                               kedit_main, line_reader, kedit_env):
    """Issue 38.6: after a kill -9 of a forced promotion and its repair, the gate report had no override
    section and no override.json."""
    from kedit.cli import main

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    report = tmp_path / "report"
    report.mkdir()
    (report / "gate.json").write_text(json.dumps({"passed": False}))
    (report / "gate.md").write_text("# Gate report\n")
    store.record_gate(s1.id, {"passed": False}, against=None, report=str(report))
    proc = subprocess.Popen([sys.executable, "-c", kedit_main, "-w", str(workspace.root), "lineage",
                             "promote",
                             s1.id[:12], "--by", "mallory", "--force", "--reason", "hotfix", "--no-mlflow", "--no-dvc"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=kedit_env(KEDIT_TEST_PAUSE_AT="event"), cwd=str(workspace.root))
    try:
        err = line_reader(proc.stderr)
        assert err.wait_for("paused after step 'event'", timeout=300), "".join(err.seen)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert store.champion() == s1.id and not (report / "override.json").exists()
    assert main(["-w", str(workspace.root), "lineage", "repair"]) == 0
    over = [e for e in store.events() if e.type == "override"]
    assert json.loads((report / "override.json").read_text())["seq"] == over[0].seq
    md = (report / "gate.md").read_text()
    assert md.count("## Override") == 1 and "hotfix" in md
    assert read_intent(store.root) is None
    ops.repair(workspace, store, OFF)  # nothing left: not written twice
    assert (report / "gate.md").read_text().count("## Override") == 1


def test_override_without_its_promotion_is_not_shown_as_one(workspace, stored_lm, monkeypatch, capsys,
                                                            run_batches):
    """Issue 38.6: a kill between the override event and the promote event left "OVERRIDE" on a state that
    was never promoted."""
    from kedit.cli import main

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    store.record_gate(s1.id, {"passed": False}, against=None)
    real = LineageStore._event

    def dies_before_promote(self, type_, *a, **k):
        if type_ == "promote":
            raise KeyboardInterrupt("killed")  # the process ends between the two events
        return real(self, type_, *a, **k)

    monkeypatch.setattr(LineageStore, "_event", dies_before_promote)
    with pytest.raises(KeyboardInterrupt):
        ops.promote(workspace, store, s1.id, by="mallory", params=OFF, override="hotfix")
    monkeypatch.setattr(LineageStore, "_event", real)
    assert store.champion() is None and [e.type for e in store.events()] == ["gate", "override"]
    w = ["-w", str(workspace.root)]
    assert main([*w, "lineage", "repair"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert main([*w, "lineage", "log"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "OVERRIDE" not in out and "not followed by its promote (interrupted; nothing moved)" in out


def test_require_distinct_approver(workspace, stored_lm, monkeypatch, run_batches, gate_and_approve):
    """Issue 38.6: the same account could approve and promote; `lineage.require_distinct_approver` refuses it."""
    lm = stored_lm()
    (s1, s2) = run_batches(LineageStore(workspace.lineage_dir), lm, 2)
    (workspace.root / "params.yaml").write_text("lineage: {require_distinct_approver: true}\n")
    params = {**ops.lineage_params(workspace), "mlflow": False, "dvc": False}
    store = ops.open_store(workspace, params)
    assert store.require_distinct_approver
    monkeypatch.setenv("KEDIT_IDENTITY", "alice")
    gate_and_approve(store, s1, by="alice")
    with pytest.raises(PromotionRefused, match="approved by alice .* may not also promote"):
        ops.promote(workspace, store, s1.id, by="alice", params=params)
    with pytest.raises(PromotionRefused, match="may not also promote"):  # another name, the same identity
        ops.promote(workspace, store, s1.id, by="bob", params=params)
    monkeypatch.setenv("KEDIT_IDENTITY", "bob")
    with pytest.raises(PromotionRefused, match="may not also promote"):  # another identity, the approver's name
        ops.promote(workspace, store, s1.id, by="Alice", params=params)
    ops.promote(workspace, store, s1.id, by="bob", params=params)
    assert store.champion() == s1.id
    # the Python API with a store made without the flag: ops.promote reads params.yaml's
    monkeypatch.setenv("KEDIT_IDENTITY", "dave")
    gate_and_approve(store, s2, by="dave")
    with pytest.raises(PromotionRefused, match="may not also promote"):
        ops.promote(workspace, LineageStore(workspace.lineage_dir), s2.id, by="dave", params=params)
    # off (the default): one account may do both
    monkeypatch.setenv("KEDIT_IDENTITY", "carol")
    plain = LineageStore(workspace.lineage_dir)
    gate_and_approve(plain, s2, by="carol")
    ops.promote(workspace, plain, s2.id, by="carol", params={**params, "require_distinct_approver": False})
    assert plain.champion() == s2.id


def test_chain_starts_at_genesis(tmp_path):
    store = LineageStore(tmp_path / "lineage")
    a = store.rollback(None, by="alice", reason="r")
    b = store.rollback(None, by="bob", reason="r")
    assert a.prev == GENESIS and b.prev == a.digest and store.chain().head == b.digest


@pytest.mark.skipif(shutil.which("ssh-keygen") is None or shutil.which("git") is None,
                    reason="git or ssh-keygen not installed")
def test_signed_promotion_commits_catch_a_recomputed_chain(workspace, stored_lm, tmp_path, monkeypatch,
                                                           run_batches, gate_and_approve):
    """The option that closes what the chain leaves open: a writer who edits an event and recomputes the
    chain passes the chain check, but not the promotion commit that named the old digest (signed with a
    key the writer lacks)."""
    from kedit.lineage.versioning import Versioning, state_tag

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    v = Versioning(workspace)
    v.ensure()
    key = tmp_path / "approver_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kedit", "-f", str(key)], check=True)
    (tmp_path / "allowed").write_text(f"kedit@localhost {(tmp_path / 'approver_key.pub').read_text()}")
    for k, val in (("gpg.format", "ssh"), ("user.signingkey", str(key)),
                   ("gpg.ssh.allowedSignersFile", str(tmp_path / "allowed"))):
        v.git("config", k, val)
    params = {**OFF, "dvc": True, "sign_commits": True}
    gate_and_approve(store, s1)
    ops.promote(workspace, store, s1.id, by="alice", params=params)
    assert v.verify_commit(state_tag(s1.id)) is None  # signed with the configured key
    assert f"[kedit chain {store.champion_event().digest}]" in v.tag_message(state_tag(s1.id))
    assert ops.divergences(workspace, store, params) == []

    # rewrite: the approval's comment edited, every digest after it recomputed (the chain checks out)
    prev = None
    for p in sorted(store.events_dir.glob("*.json")):
        raw = json.loads(p.read_text())
        if raw["type"] == "approve":
            raw["comment"] = "rewritten"
        sealed = seal(raw, prev or raw["prev"])
        p.write_text(json.dumps(sealed))
        prev = sealed["digest"]
    assert store.chain().problems == [] and store.promotion_check(s1.id).ok
    problems = ops.divergences(workspace, store, params)
    assert any(f"recorded event {store.champion_event().seq} with chain digest" in p and "were rewritten" in p
               for p in problems), problems
    # an unsigned promotion commit is named when signing is required
    v.git("config", "--unset", "user.signingkey")
    store2 = LineageStore(workspace.lineage_dir)
    ops.rollback(workspace, store2, None, by="bob", reason="r", params={**params, "sign_commits": False})
    assert any("no good signature" in p for p in ops.divergences(workspace, store2, params))


def test_a_number_written_twice_keeps_the_event_that_continues_the_chain(tmp_path, forge_event):
    store = LineageStore(tmp_path / "lineage")
    store.rollback(None, by="alice", reason="r")
    real = store.rollback(None, by="bob", reason="r")
    third = store.rollback(None, by="carol", reason="r")
    raw = {**real.to_dict(), "type": "approve", "by": "mallory"}  # sorts before 000002-rollback.json
    raw.pop("prev"), raw.pop("digest")
    forge_event(store, "000002-approve.json", raw)
    chain = store.chain()
    assert list(chain.bad) == ["000002-approve.json"] and "written twice" in chain.bad["000002-approve.json"]
    assert chain.head == third.digest and store.champion_event() == third
