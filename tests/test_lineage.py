"""Lineage store: round trip with rollback and branching, crash safety at every commit step,
corruption named by file, locking, and the no-pickle rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kedit.atomic import sha256_tensor
from kedit.editors.base import EditorState, EditResult, apply_deltas
from kedit.lineage import COMMIT_STEPS, LineageCorruptError, LineageError, LineageStore
from kedit.lineage.state import DELTAS_FILE, STATE_FILE

EDITED_LAYERS = (1, 2)


def fabricate(lm, prev: EditorState | None, seed: int, rows: list[str], layers=EDITED_LAYERS) -> EditResult:
    """A rank-2 update on the MLP output of ``layers`` and an AlphaEdit-like Σ K Kᵀ state that accumulates."""
    g = torch.Generator().manual_seed(seed)
    deltas, tensors = {}, {}
    for i in layers:
        w = lm.adapter.weight(i)
        out_dim, key_dim = w.shape
        k = torch.randn(key_dim, 2, generator=g)
        r = torch.randn(out_dim, 2, generator=g) * 0.05
        deltas[lm.adapter.weight_name(i)] = lm.adapter.to_stored(r @ k.T)
        name = f"cache_c.{i}"
        base = prev.tensors[name] if prev and name in prev.tensors else torch.zeros(key_dim, key_dim)
        tensors[name] = base + k @ k.T
    n_prev = prev.meta.get("n_edits", 0) if prev else 0
    state = EditorState("alphaedit", tensors, {"n_edits": n_prev + len(rows), "layers": list(layers)})
    return EditResult(deltas=deltas, state=state, diagnostics=[])


PROMPTS = ["The Eiffel Tower is located in", "Danielle Darrieux speaks", "Rome is the capital of"]


def predict(lm) -> dict[str, str]:
    """Greedy next token for a few prompts, one batched forward pass."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = lm.model(**enc).logits[:, -1]
    return {p: tok.decode([int(t)]) + f"|{float(v):.6f}" for p, t, v in zip(PROMPTS, logits.argmax(-1),
                                                                         logits.max(-1).values)}


def feed(i: int) -> dict:
    return {"file_sha256": f"feed{i}", "path": f"feeds/day{i}.jsonl", "row_ids": [f"r{i}a", f"r{i}b"]}


def gate_and_approve(store, s, by="alice") -> None:
    """What a promotion needs first: a passed gate verdict against the parent, then an approval."""
    store.record_gate(s.id, {"passed": True}, against=s.parent)
    store.approve(s.id, by=by)


def edited_hashes(lm, names) -> dict[str, str]:
    params = dict(lm.model.named_parameters())
    return {n: sha256_tensor(params[n]) for n in names}


@pytest.fixture
def stored_lm(workspace, tiny_tokenizer, tmp_path):
    """The tiny Llama imported into the workspace model store (so export and base files work)."""
    from kedit.models.store import import_hf, load_model
    from tests.conftest import make_tiny_model

    src = tmp_path / "tiny-src"
    make_tiny_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    import_hf(workspace, src, slug="tiny-llama")
    return lambda: load_model("tiny-llama", workspace)


def run_batches(store, lm, n, parent=None, prev=None, seed0=0):
    states = []
    for i in range(n):
        res = fabricate(lm, prev, seed0 + i, feed(seed0 + i)["row_ids"])
        apply_deltas(lm.model, res.deltas)
        s = store.commit(lm, res, parent=parent, feed=feed(seed0 + i), hparams={"method": "alphaedit", "L2": 10},
                         evaluation={"efficacy": 0.9}, predictions=predict(lm))
        states.append(s)
        parent, prev = s.id, res.state
    return states


def test_round_trip_rollback_and_branch(workspace, stored_lm):
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    s1, s2, s3 = run_batches(store, lm, 3)
    assert [s.parent for s in (s1, s2, s3)] == [None, s1.id, s2.id]
    assert (s1.snapshot, s2.snapshot, s3.snapshot) == (False, True, False)
    assert s3.editor_state["tensors"]["cache_c.1"]["sha256"] != s1.editor_state["tensors"]["cache_c.1"]["sha256"]
    gate_and_approve(store, s3)
    store.promote(s3.id, by="alice", comment="nightly ok")
    store.rollback(s1.id, by="bob", reason="bad facts in day 2")
    assert store.champion() == s1.id

    # a fresh base model (another process) and the edited one (in place) both land exactly on s1
    for target in (stored_lm(), lm):
        es = store.materialise(store.champion(), target)
        assert edited_hashes(target, s1.tensor_sha256) == s1.tensor_sha256
        assert predict(target) == s1.predictions
        assert es.meta["n_edits"] == 2
        ref = fabricate(target, None, 0, feed(0)["row_ids"]).state.tensors
        assert all(torch.equal(es.tensors[k], ref[k]) for k in ref)

    # a new batch on the rollback starts a branch and accumulates on s1's editor state, not s3's
    res4 = fabricate(lm, es, 40, feed(40)["row_ids"])
    g = torch.Generator().manual_seed(40)
    k1 = torch.randn(lm.adapter.key_dim(1), 2, generator=g)
    assert torch.equal(res4.state.tensors["cache_c.1"], ref["cache_c.1"] + k1 @ k1.T)
    apply_deltas(lm.model, res4.deltas)
    s4 = store.commit(lm, res4, parent=store.champion(), feed=feed(40), hparams={}, predictions=predict(lm))
    assert s4.parent == s1.id and s4.depth == 2
    assert store.editor_state(s4.id).meta["n_edits"] == 4
    assert sorted(map(tuple, store.branches())) == sorted([(s1.id, s2.id, s3.id), (s1.id, s4.id)])
    # the old branch stays auditable and exact
    fresh = stored_lm()
    store.materialise(s3.id, fresh)
    assert edited_hashes(fresh, s3.tensor_sha256) == s3.tensor_sha256 and predict(fresh) == s3.predictions
    # back to the base model resets every tensor the lineage ever edited
    store.materialise(None, fresh)
    assert edited_hashes(fresh, s3.base_sha256) == s3.base_sha256
    rep = store.verify()
    assert rep.ok, rep.problems
    assert rep.states == 4
    # diff: facts and per-module norms
    d = store.diff(s3.id, s4.id)
    assert d["common_ancestor"] == s1.id
    assert d["added"] == ["r40a", "r40b"] and d["removed"] == ["r1a", "r1b", "r2a", "r2b"]
    assert set(d["modules"]) == set(s3.tensor_sha256)
    w3, w4 = store.tensors(s3.id), store.tensors(s4.id)
    n = lm.adapter.weight_name(1)
    assert d["modules"][n]["delta_norm"] == pytest.approx(float((w4[n].double() - w3[n].double()).norm()))
    # log: champion marked, tree links
    entries = {e.state.id: e for e in store.log()}
    assert entries[s1.id].champion and sorted(entries[s1.id].children) == sorted([s2.id, s4.id])


def test_commit_is_content_addressed_and_checks_the_model(workspace, stored_lm):
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    res = fabricate(lm, None, 0, ["a"])
    s = store.commit(lm, res, None, feed(0), {"x": 1})  # before apply_deltas: also fine
    apply_deltas(lm.model, res.deltas)
    again = store.commit(lm, res, None, feed(0), {"x": 1})  # after: same content, same id
    assert again.id == s.id and len(store.states()) == 1
    assert store.get(s.id[:8]).id == s.id
    # the model is at s; a batch claimed to start from the base model is refused
    res2 = fabricate(lm, None, 1, ["b"])
    with pytest.raises(LineageError, match="neither at the parent state"):
        store.commit(lm, res2, None, feed(1), {})
    with pytest.raises(LineageError, match="no edit state"):
        store.get("ffffffff")
    with pytest.raises(ValueError, match="JSON"):
        store.commit(lm, res2, s.id, {"when": object()}, {})


def test_in_memory_model_commit(tiny_lm):
    """A wrap_model'd model with no files: the base is recovered and checked against its digest."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        store = LineageStore(Path(d) / "lineage")
        res = fabricate(tiny_lm, None, 0, ["a"])
        s = store.commit(tiny_lm, res, None, feed(0), {})  # not applied yet
        apply_deltas(tiny_lm.model, res.deltas)
        assert edited_hashes(tiny_lm, s.tensor_sha256) == s.tensor_sha256


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_crash_at_each_commit_step_leaves_previous_state(workspace, stored_lm, step):
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)  # state 2 writes a snapshot
    (s1,) = run_batches(store, lm, 1)
    res = fabricate(lm, store.editor_state(s1.id), 7, ["x"])

    def crash(name):
        if name == step:
            raise RuntimeError(f"killed after {name}")

    store.fault_hook = crash
    apply_deltas(lm.model, res.deltas)
    with pytest.raises(RuntimeError, match="killed"):
        store.commit(lm, res, s1.id, feed(7), {})
    reopened = LineageStore(workspace.lineage_dir, snapshot_every=2)
    published = step == "publish"  # the rename happened: the new state is whole
    assert [s.id for s in reopened.states()] == ([s1.id] if not published else [s1.id, reopened.states()[-1].id])
    fresh = stored_lm()
    reopened.materialise(s1.id, fresh)
    assert edited_hashes(fresh, s1.tensor_sha256) == s1.tensor_sha256
    assert reopened.lock_holder() == {}  # released (the file stays: the lock is the kernel's)
    s2 = reopened.commit(lm, res, s1.id, feed(7), {})  # the retry completes (or finds the published state)
    rep = reopened.verify()
    assert rep.ok, rep.problems
    assert not (workspace.lineage_dir / ".staging").exists() or not any((workspace.lineage_dir / ".staging").iterdir())
    assert reopened.get(s2.id).snapshot


def test_lock_one_writer(workspace, stored_lm):
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    gate_and_approve(store, s1)
    other = LineageStore(workspace.lineage_dir)
    with store.lock():
        with pytest.raises(LineageError, match=r"locked by pid \d+"):
            other.promote(s1.id, by="x")
    # a lock left by a dead process (killed writer) is taken over
    store.lock_path.write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename, "since": "then"}))
    other.promote(s1.id, by="x")
    assert other.champion() == s1.id


def _flip(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - offset_from_end
    i -= i % 4
    data[i + 3] ^= 0x40  # the exponent byte of a little-endian float32: always changes the sum
    path.write_bytes(bytes(data))


def test_corruption_is_named(workspace, stored_lm):
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=100)
    s1, s2 = run_batches(store, lm, 2)
    bad = workspace.lineage_dir / "states" / s2.id / DELTAS_FILE
    _flip(bad, 1000)
    rep = LineageStore(workspace.lineage_dir).verify()
    assert not rep.ok and any(str(bad) in p for p in rep.problems), rep.problems
    with pytest.raises(LineageCorruptError, match=str(bad)):
        LineageStore(workspace.lineage_dir).materialise(s2.id, stored_lm())
    LineageStore(workspace.lineage_dir).materialise(s1.id, stored_lm())  # the parent is intact
    # a hand-edited record no longer matches its id
    mf = workspace.lineage_dir / "states" / s1.id / STATE_FILE
    rec = json.loads(mf.read_text())
    rec["hparams"]["L2"] = 99
    mf.write_text(json.dumps(rec))
    with pytest.raises(LineageCorruptError, match=str(mf)):
        LineageStore(workspace.lineage_dir).get(s1.id)


def test_store_holds_no_pickle(workspace, stored_lm):
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=1)
    run_batches(store, lm, 2)
    store.record_gate(store.states()[-1].id, {"passed": True}, against=store.states()[-1].parent)
    kinds = {p.suffix for p in workspace.lineage_dir.rglob("*") if p.is_file()}
    assert kinds <= {".json", ".safetensors", ""}, kinds
    for p in workspace.lineage_dir.rglob("*.json"):
        json.loads(p.read_text())
    entry = store.log()[-1]
    assert entry.gate == {"passed": True}


def test_cli_log_show_diff_verify_rollback_export(workspace, stored_lm, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    from kedit.cli import main

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    s1, s2 = run_batches(store, lm, 2)
    store.record_gate(s2.id, {"passed": False, "locality": 0.7}, against=s1.id)
    store.promote(s2.id, by="alice", comment="ok", override="gate too strict for this test")
    w = ["-w", str(workspace.root)]
    assert main([*w, "lineage", "log"]) == 0
    out = capsys.readouterr().out
    assert s1.id[:12] in out and "★ champion" in out and "gate: FAIL" in out and "2 states" in out
    assert main([*w, "lineage", "show", s1.id[:8]]) == 0
    assert json.loads(capsys.readouterr().out)["state"]["id"] == s1.id
    assert main([*w, "lineage", "diff", "base", s2.id[:8]]) == 0
    out = capsys.readouterr().out
    assert "facts added (4)" in out and lm.adapter.weight_name(1) in out
    assert main([*w, "lineage", "verify"]) == 0
    assert "lineage OK" in capsys.readouterr().out
    assert main([*w, "rollback", s1.id[:10], "--reason", "day 2 regressed", "--by", "bob"]) == 0
    out = capsys.readouterr().out
    assert "champion is now" in out and "editor state restored" in out
    assert LineageStore(workspace.lineage_dir).champion() == s1.id
    assert main([*w, "rollback", "nope", "--reason", "x"]) == 2  # clear error, no traceback
    assert "no edit state" in capsys.readouterr().err
    assert main([*w, "export", "champion", "--out", str(tmp_path / "served")]) == 0
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "served")
    params = dict(served.named_parameters())
    assert {n: sha256_tensor(params[n]) for n in s1.tensor_sha256} == s1.tensor_sha256
    assert json.loads((tmp_path / "served" / "kedit_state.json").read_text())["state"]["id"] == s1.id
    # a weight-edit state is a plain directory: no shipped code, no auto_map
    assert not list((tmp_path / "served").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "served" / "config.json").read_text())
    _flip(workspace.lineage_dir / "states" / s2.id / DELTAS_FILE, 500)
    assert main([*w, "lineage", "verify", "--quick"]) == 1
    assert "deltas.safetensors" in capsys.readouterr().out
