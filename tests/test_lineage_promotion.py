"""Promotion safety: no champion without a passed gate and an approval (override only with a recorded
reason), who did it recorded from the OS, rollback to base moving every store, one lock over a whole
promotion, a kill -9 between the store event and the MLflow move repaired by the next command, one
answer to "who is champion", and `kedit ... | head` without a BrokenPipeError traceback."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kedit.atomic import sha256_file, sha256_json, sha256_tensor
from kedit.lineage import LineageError, LineageStore, ops
from kedit.lineage.intent import Intent, read_intent, write_intent
from kedit.lineage.policy import PromotionRefused, promotion_check, rollback_check
from kedit.lineage.state import EditState, Event
from kedit.lineage.versioning import Versioning, state_tag
from tests.test_lineage import gate_and_approve, run_batches, stored_lm  # noqa: F401  (fixture re-export)

ROOT = Path(__file__).resolve().parents[1]
MAIN = "import sys; from kedit.cli import main; sys.exit(main(sys.argv[1:]))"  # what the `kedit` script runs
MLFLOW_ONLY = {"mlflow": True, "dvc": False, "snapshot_every": 20, "model_prefix": "kedit", "dvc_remote": None}


def _kedit_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _state(sid: str, parent: str | None) -> EditState:
    return EditState(id=sid, parent=parent, base_model_hash="h", base_model_slug="m", feed={}, method="alphaedit",
                     hparams={}, deltas={}, editor_state={}, tensor_sha256={}, base_sha256={})


def _ev(seq: int, type_: str, state: str | None, **data) -> Event:
    return Event(seq=seq, type=type_, state=state, by="someone", at="t", data=data)


def test_promotion_rules_over_the_events():
    """A passed gate against the parent, then an approval, and no later rejection or failed verdict."""
    s = _state("s2" * 32, "s1" * 32)
    gate_ok = _ev(1, "gate", s.id, gate={"passed": True}, against=s.parent)
    approve = _ev(2, "approve", s.id)
    assert promotion_check([gate_ok, approve], s).ok
    assert promotion_check([gate_ok, approve], s).gate_event == 1
    # nothing recorded; a verdict against another state; the legacy verdict that names nothing
    assert len(promotion_check([], s).unmet) == 2
    other = _ev(1, "gate", s.id, gate={"passed": True}, against="s9" * 32)
    assert "against its parent" in promotion_check([other, approve], s).unmet[0]
    legacy = _ev(1, "gate", s.id, gate={"passed": True})
    assert not promotion_check([legacy, approve], s).ok
    # a failed verdict, even approved, or a "passed" that is not the boolean true
    failed = _ev(1, "gate", s.id, gate={"passed": False}, against=s.parent)
    assert "FAILED" in promotion_check([failed, approve], s).unmet[0]
    assert not promotion_check([_ev(1, "gate", s.id, gate={"passed": "yes"}, against=s.parent), approve], s).ok
    # an approval given before the verdict did not see it; a later reject or failed verdict wins
    assert "no approval" in promotion_check([_ev(0, "approve", s.id), gate_ok], s).unmet[0]
    assert "rejected" in promotion_check([gate_ok, approve, _ev(3, "reject", s.id)], s).unmet[0]
    refail = _ev(3, "gate", s.id, gate={"passed": False}, against=s.parent)
    assert not promotion_check([gate_ok, approve, refail], s).ok
    # approvals of another state do not count; a first state's parent is the base model (None)
    assert not promotion_check([gate_ok, _ev(2, "approve", "s9" * 32)], s).ok
    first = _state("s1" * 32, None)
    assert promotion_check([_ev(1, "gate", first.id, gate={"passed": True}, against=None),
                            _ev(2, "approve", first.id)], first).ok


def test_rollback_targets_are_former_champions_or_their_ancestors():
    a, b, c, d = _state("a" * 64, None), _state("b" * 64, "a" * 64), _state("c" * 64, "b" * 64), _state("d" * 64, "a" * 64)
    states = {s.id: s for s in (a, b, c, d)}
    events = [_ev(1, "promote", c.id)]
    assert rollback_check(events, states, None).ok  # the base model
    assert rollback_check(events, states, b.id).ok and rollback_check(events, states, a.id).ok
    assert not rollback_check(events, states, d.id).ok  # a branch never promoted: that is a promotion
    assert not rollback_check([], states, a.id).ok


def test_gate_failed_state_is_not_promoted_without_a_recorded_override(workspace, stored_lm, capsys, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    """Issue 19.1: `lineage promote STATE --by mallory` of a gate-failed state used to return 0."""
    from kedit.cli import main

    monkeypatch.delenv("KEDIT_IDENTITY", raising=False)

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    report = tmp_path / "reports" / "k" / "gate"
    report.mkdir(parents=True)
    (report / "gate.md").write_text("# Gate report\n\nverdict: FAILED\n")
    store.record_gate(s1.id, {"passed": False}, against=None, report=str(report))
    w = ["-w", str(workspace.root)]

    assert main([*w, "lineage", "promote", s1.id[:12], "--by", "mallory", "--comment", "forged"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "FAILED" in err and "no approval" in err and "--force --reason" in err
    assert store.champion() is None and not [e for e in store.events() if e.type == "promote"]
    # an approval does not make a failed gate pass
    assert main([*w, "lineage", "approve", s1.id[:12], "--by", "mallory"]) == 0
    assert "not promotable yet" in capsys.readouterr().out
    assert main([*w, "lineage", "promote", s1.id[:12], "--by", "mallory"]) == 2
    assert main([*w, "lineage", "promote", s1.id[:12], "--by", "mallory", "--force"]) == 2  # no reason
    assert "--reason" in capsys.readouterr().err
    assert store.champion() is None

    assert main([*w, "lineage", "promote", s1.id[:12], "--by", "mallory", "--force", "--reason", "hotfix"]) == 0
    assert "OVERRIDE recorded" in capsys.readouterr().out
    assert store.champion() == s1.id
    over = [e for e in store.events() if e.type == "override"]
    assert len(over) == 1 and over[0].comment == "hotfix" and any("FAILED" in u for u in over[0].data["unmet"])
    promote = store.champion_event()
    assert promote.data["override_event"] == over[0].seq
    from kedit.lineage.identity import os_user

    assert over[0].actor["os_user"] == os_user()[0] and over[0].actor["pid"] > 0
    # the log shows the override and does not call the promoter an approver of a failed gate
    assert main([*w, "lineage", "log"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps lines at the console width
    assert "gate: FAIL" in out and f"OVERRIDE (promote) by mallory [{os_user()[0]}]: hotfix" in out
    assert "approved by mallory" in out and f"promoted by mallory [{os_user()[0]}]" in out
    # the gate report says so
    assert "## Override" in (report / "gate.md").read_text() and "hotfix" in (report / "gate.md").read_text()
    assert json.loads((report / "override.json").read_text())["seq"] == over[0].seq


def test_actor_is_the_os_account_not_the_user_variable(workspace, stored_lm, monkeypatch):  # noqa: F811
    from kedit.lineage.identity import os_user

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LOGNAME", "mallory")
    monkeypatch.delenv("KEDIT_IDENTITY", raising=False)
    ev = store.approve(s1.id, by="alice")
    real = os_user()[0]
    assert ev.by == "alice" and ev.actor["os_user"] == real and ev.actor["identity"] == real
    assert ev.actor["configured"] is False
    monkeypatch.setenv("KEDIT_IDENTITY", "kedit-nightly")
    ev = store.approve(s1.id, by="alice")
    assert ev.actor["identity"] == "kedit-nightly" and ev.actor["os_user"] == real and ev.actor["configured"]
    assert json.loads(next(workspace.lineage_dir.glob(f"events/{ev.seq:06d}-*.json")).read_text())["actor"] == ev.actor


def test_every_promotion_path_meets_the_rules(workspace, stored_lm, monkeypatch):  # noqa: F811
    """The nightly decide step and the Prefect operator task go through the same rules as the CLI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from kedit.refresh import decide_step
    from tasks import ops as op_tasks

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    store.record_gate(s1.id, {"passed": False}, against=None)
    with pytest.raises(PromotionRefused, match="FAILED"):
        decide_step(workspace, "k", s1.id, True, "mallory", "approve anyway")
    with pytest.raises(PromotionRefused, match="FAILED"):
        op_tasks.promote.fn(str(workspace.root), s1.id, "mallory", "forged")
    with pytest.raises(PromotionRefused):
        store.promote(s1.id, by="mallory")  # the store event itself checks too
    assert store.champion() is None
    # rollback to a never-promoted state is a promotion by another name
    with pytest.raises(PromotionRefused, match="never champion"):
        op_tasks.rollback.fn(str(workspace.root), s1.id, "mallory", "sneaky")
    assert store.champion() is None
    # the nightly path with a passed gate and the reviewer's approval promotes, recording both events
    store.record_gate(s1.id, {"passed": True}, against=None)
    out = decide_step(workspace, "k", s1.id, True, "alice", "looks right")
    assert out["decision"] == "promoted" and store.champion() == s1.id
    kinds = [(e.type, e.by) for e in store.events()][-2:]
    assert kinds == [("approve", "alice"), ("promote", "alice")]


def _greedy(lm, prompt: str) -> str:
    from kedit.evaluation.metrics import greedy_tokens
    from kedit.lineage.mlflow_model import DEFAULT_NEW_TOKENS

    return lm.tokenizer.decode(greedy_tokens(lm, [prompt], k=DEFAULT_NEW_TOKENS)[0].tolist(), skip_special_tokens=True)


def _base_of(path: Path, names) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    params = dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())
    return {n: sha256_tensor(params[n]) for n in names}


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                    reason="git not installed")
def test_rollback_base_moves_mlflow_and_git_and_exports(workspace, stored_lm, capsys, tmp_path, monkeypatch):  # noqa: F811
    """Issue 19.2: `kedit rollback base` left MLflow's champion alias on the edited version, made no git
    commit, and `kedit export champion` then said "no champion yet"."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    from kedit.cli import main
    from kedit.lineage.registry import TAG_BASE, TAG_STATE, ModelRegistry, Tracking

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    gate_and_approve(store, s1)
    v = Versioning(workspace)
    v.ensure()
    ops.register_candidate(workspace, store, s1.id, params=MLFLOW_ONLY)
    w = ["-w", str(workspace.root)]
    assert main([*w, "lineage", "promote", s1.id[:12], "--comment", "nightly"]) == 0
    reg = ModelRegistry(Tracking(workspace), "tiny-llama")
    assert reg.alias("champion").tags[TAG_STATE] == s1.id
    capsys.readouterr()

    assert main([*w, "rollback", "base", "--reason", "day 1 regressed", "--by", "bob"]) == 0
    out = capsys.readouterr().out
    assert "champion is now base" in out and "kedit/state/base" in out and "alias champion" in out
    assert store.champion() is None
    assert (workspace.lineage_dir / "CHAMPION").read_text().strip() == "base"
    champ = reg.alias("champion")
    assert champ.tags[TAG_STATE] == "base" and champ.tags[TAG_BASE] == s1.base_model_hash
    ev = store.champion_event()
    assert f"[kedit event {ev.seq}]" in v.tag_message(state_tag("base"))
    base_answers = mlflow.pyfunc.load_model(f"models:/{reg.name}@champion").predict(["Rome is the capital of"])
    assert base_answers == [_greedy(stored_lm(), "Rome is the capital of")]
    assert main([*w, "lineage", "verify", "--quick"]) == 0
    assert "lineage OK" in capsys.readouterr().out

    assert main([*w, "export", "champion", "--out", str(tmp_path / "champ")]) == 0
    assert main([*w, "export", "base", "--out", str(tmp_path / "base")]) == 0
    assert "the base model" in capsys.readouterr().out
    for d in ("champ", "base"):
        assert _base_of(tmp_path / d, s1.base_sha256) == s1.base_sha256
        assert json.loads((tmp_path / d / "kedit_state.json").read_text())["state"] is None
    # rolling back to base again reuses the base version; re-promoting needs no new gate (s1 has one)
    n = len(reg.versions())
    assert main([*w, "rollback", "base", "--reason", "again"]) == 0
    assert len(reg.versions()) == n
    assert main([*w, "lineage", "promote", s1.id[:12]]) == 0
    assert reg.alias("champion").tags[TAG_STATE] == s1.id


class _Lines:
    """stderr of a child process, line by line, without blocking the test forever."""

    def __init__(self, stream) -> None:
        self.q: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.q.put(line) for line in stream], daemon=True).start()

    def wait_for(self, text: str, timeout: float) -> bool:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.q.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return True
        return False


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                    reason="git not installed")
def test_kill9_between_store_event_and_mlflow_is_repaired(workspace, stored_lm, capsys, caplog, monkeypatch):  # noqa: F811
    """Issue 19.3: a promote killed (SIGKILL, a real process) after its lineage event and before git and
    MLflow; meanwhile a second writer is refused by name; afterwards every command reports the
    divergence, and `kedit lineage repair` brings git + DVC and MLflow to the event."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from kedit.cli import main
    from kedit.lineage.registry import TAG_STATE, ModelRegistry, Tracking

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    s1, s2 = run_batches(store, lm, 2)
    gate_and_approve(store, s1)
    Versioning(workspace).ensure()
    ops.register_candidate(workspace, store, s1.id, params=MLFLOW_ONLY)
    proc = subprocess.Popen([sys.executable, "-c", MAIN, "-w", str(workspace.root), "lineage", "promote",
                             s1.id[:12], "--by", "alice", "--comment", "nightly"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_kedit_env(KEDIT_TEST_PAUSE_AT="event"), cwd=str(workspace.root))
    try:
        err = _Lines(proc.stderr)
        assert err.wait_for("paused after step 'event'", timeout=300), "".join(err.seen)
        # the event is written, the lock is held over the rest: a second writer is told who holds it
        assert store.champion() == s1.id
        with pytest.raises(LineageError, match=rf"locked by pid {proc.pid} on .* since .*promote {s1.id[:12]}"):
            store.approve(s2.id, by="bob")
        assert read_intent(workspace.lineage_dir).done == ["event"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    reg = ModelRegistry(Tracking(workspace), "tiny-llama")
    assert reg.alias("champion") is None  # MLflow was never moved
    assert state_tag(s1.id) not in Versioning(workspace).tags()
    w = ["-w", str(workspace.root)]
    caplog.clear()
    assert main([*w, "lineage", "log"]) == 0  # a read-only command reports it
    assert any("interrupted promote" in r.getMessage() and "kedit lineage repair" in r.getMessage()
               for r in caplog.records)
    capsys.readouterr()
    assert main([*w, "lineage", "verify", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "interrupted promote" in out and "MLflow: kedit-tiny-llama@champion is not set" in out
    assert f"git: tag {state_tag(s1.id)} is missing" in out

    assert main([*w, "lineage", "repair"]) == 0
    out = capsys.readouterr().out
    assert "finished an interrupted promote" in out
    assert reg.alias("champion").tags[TAG_STATE] == s1.id
    assert f"[kedit event {store.champion_event().seq}]" in Versioning(workspace).tag_message(state_tag(s1.id))
    assert read_intent(workspace.lineage_dir) is None and store.lock_holder() == {}
    assert main([*w, "lineage", "verify", "--quick"]) == 0
    assert main([*w, "lineage", "repair"]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_next_promotion_finishes_or_drops_an_interrupted_one(workspace, stored_lm, monkeypatch):  # noqa: F811
    """What a crash leaves, as files: an intent with its event recorded (finished by the next promote),
    and an intent whose event never got written (dropped: nothing had changed)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from kedit.lineage.registry import TAG_STATE, ModelRegistry, Tracking

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    s1, s2 = run_batches(store, lm, 2)
    gate_and_approve(store, s1)
    gate_and_approve(store, s2)
    ops.register_candidate(workspace, store, s2.id, params=MLFLOW_ONLY)
    # crashed after the event: recorded with its intent, MLflow not moved
    intent = Intent(op="promote", target=s1.id, by="alice", mlflow=True, dvc=False)
    write_intent(store.root, intent)
    ev = store.promote(s1.id, by="alice", data={"intent": intent.id})
    intent.done, intent.out = ["event"], {"event_seq": ev.seq}
    write_intent(store.root, intent)
    (store.root / "CHAMPION").unlink()
    assert any("interrupted promote" in p for p in ops.divergences(workspace, store, MLFLOW_ONLY))
    reg = ModelRegistry(Tracking(workspace), "tiny-llama")
    assert reg.alias("champion") is None
    out = ops.promote(workspace, store, s2.id, by="bob", params=MLFLOW_ONLY)
    assert "finished an interrupted promote" in out["repaired"]
    assert reg.alias("champion").tags[TAG_STATE] == s2.id and store.champion() == s2.id
    assert read_intent(store.root) is None and ops.divergences(workspace, store, MLFLOW_ONLY) == []
    # crashed before the event: nothing happened, the intent is dropped
    write_intent(store.root, Intent(op="rollback", target=s1.id, by="carol", mlflow=True, dvc=False))
    res = ops.repair(workspace, store, MLFLOW_ONLY)
    assert any("nothing changed" in d for d in res["done"]) and res["after"] == []
    assert store.champion() == s2.id and reg.alias("champion").tags[TAG_STATE] == s2.id


def test_one_champion_answer_whatever_the_champion_file_says(workspace, stored_lm):  # noqa: F811
    """Issue 17.2: the nightly ingest key read lineage/CHAMPION, the store read the events."""
    from kedit.refresh import RefreshConfig
    from tasks.cache import FeedKey
    from tasks.refresh import _champion

    def ingest_key(_ctx, inputs):  # the ingest task's cache key, as its policy computes it
        return FeedKey(champion_of=_champion).compute_key(None, inputs, {})

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    workspace.feeds_dir.mkdir(parents=True)
    feed = workspace.feeds_dir / "2026-01-05.jsonl"
    feed.write_text('{"id": "a"}\n')
    cfg = RefreshConfig().to_dict()
    p = {"workspace": str(workspace.root), "feed": "2026-01-05", "cfg": cfg}

    def expected() -> str:
        return "ingest-" + sha256_json([sha256_file(feed), store.champion() or "base", cfg])[:32]

    assert ingest_key(None, p) == expected()  # nothing promoted, no file: the base model, None
    gate_and_approve(store, s1)
    store.promote(s1.id, by="alice")
    champion_file = workspace.lineage_dir / "CHAMPION"
    assert champion_file.read_text().strip() == s1.id  # the convenience copy follows the events
    champion_file.write_text("0" * 64 + "\n")  # stale
    assert ingest_key(None, p) == expected() and store.champion() == s1.id
    assert any("CHAMPION" in x and "says" in x for x in ops.divergences(workspace, store, MLFLOW_ONLY))
    champion_file.unlink()  # missing
    assert ingest_key(None, p) == expected()
    assert any("CHAMPION: missing" in x for x in ops.divergences(workspace, store, MLFLOW_ONLY))
    ops.repair(workspace, store, {**MLFLOW_ONLY, "mlflow": False})
    assert champion_file.read_text().strip() == s1.id
    store.rollback(None, by="bob", reason="r")
    assert champion_file.read_text().strip() == "base" and store.champion() is None
    assert ingest_key(None, p) == expected()


@pytest.mark.parametrize("cmd", [["lineage", "log"], ["lineage", "log", "--json"], ["lineage", "show", "HEAD"]])
def test_closed_pipe_ends_quietly(workspace, stored_lm, cmd):  # noqa: F811
    """Issue 19.5a: `kedit lineage log | head` ended in a BrokenPipeError traceback."""
    lm = stored_lm()
    run_batches(LineageStore(workspace.lineage_dir), lm, 1)
    proc = subprocess.Popen([sys.executable, "-c", MAIN, "-w", str(workspace.root), *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_kedit_env())
    proc.stdout.close()  # the reader is gone before the first line: every write meets EPIPE
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert rc == 1, (rc, err)  # cut off by its reader: not a success, not a crash
