"""Each edit state as a loadable MLflow model: a real MLflow SQLite store, a tiny Llama in the model store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kedit.lineage import LineageStore, ops

NO_DVC = {"mlflow": True, "dvc": False, "snapshot_every": 2, "model_prefix": "kedit", "dvc_remote": None}


def test_champion_loads_through_mlflow_and_predicts_the_edited_answer(workspace, stored_lm, monkeypatch,
                                                                      tmp_path, commit_states,
                                                                      gate_and_approve, greedy_answers,
                                                                      answer_prompts, states_answers):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    from kedit.lineage.registry import TAG_GATE, ModelRegistry, Tracking, find_state_model, log_state_model

    lm = stored_lm()
    base_answers = greedy_answers(lm, answer_prompts)
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    states = commit_states(store, lm, 3)  # the 2nd is a snapshot: the 3rd replays from it
    edited_answers = greedy_answers(lm, answer_prompts)
    assert edited_answers != base_answers  # the edits change what the model says

    # the gate step logs the candidate with its report; registration then uses that logged model
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    (gate_dir / "gate.json").write_text(json.dumps({"passed": True, "checks": [
        {"name": "efficacy", "value": 1.0, "skipped": False}, {"name": "retention", "value": None, "skipped": True}]}))
    (gate_dir / "gate.md").write_text("# Promotion gate: PASSED\n")
    tr = Tracking(workspace)
    with tr.run("nightly") as run:
        logged = log_state_model(tr, store, states[2], run_id=run.info.run_id, gate_dir=gate_dir)
        for s in states:
            ops.register_candidate(workspace, store, s.id, run_id=run.info.run_id, params=NO_DVC)
    assert logged.tags[TAG_GATE] == "passed" and logged.source_run_id == run.info.run_id
    assert {m.key: m.value for m in logged.metrics} == {"gate.efficacy": 1.0, "n_edits": 1.0, "depth": 3.0}
    assert find_state_model(tr, states[2].id).model_id == logged.model_id  # logged once
    reg = ModelRegistry(tr, "tiny-llama")
    v3 = reg.version_of(states[2].id)
    assert v3.source == f"models:/{logged.model_id}" and v3.tags[TAG_GATE] == "passed"
    art = mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/gate/gate.md", dst_path=str(tmp_path / "a"))
    assert "PASSED" in open(art).read()
    table = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=f"edited_facts/{states[2].short}.json",
        dst_path=str(tmp_path / "t"))).read())
    assert table["columns"][:3] == ["id", "subject", "prompt"] and table["data"][0][:3] == ["r2", "Rome",
                                                                                           "Rome is the capital of"]

    # the base model is logged once, not once per state; a state carries its own files and a snapshot
    # of the edited tensors, its ancestors only their records (the same size at any depth)
    base_runs = tr.client.search_runs([tr.experiment_id], "tags.`kedit.kind` = 'base-model'")
    assert len(base_runs) == 1
    lineage = Path(mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/artifacts/workspace/lineage",
                                                       dst_path=str(tmp_path / "m")))
    held = {d.name: sorted(f.name for f in d.iterdir()) for d in (lineage / "states").iterdir()}
    assert held[states[0].id] == held[states[1].id] == ["state.json"]
    assert held[states[2].id] == ["deltas.safetensors", "editor_meta.json", "editor_state.safetensors",
                                  "snapshot.safetensors", "state.json"]
    from kedit.lineage.state import EditState

    assert EditState.from_file(lineage / "states" / states[2].id / "state.json").id == states[2].id

    gate_and_approve(store, states[2])  # promotion needs a gate verdict and an approval in the lineage
    ops.promote(workspace, store, states[2].id, by="alice", params=NO_DVC)
    assert reg.alias("champion").tags["kedit.state_id"] == states[2].id
    model = mlflow.pyfunc.load_model(f"models:/{reg.name}@champion")
    assert model.predict(answer_prompts, params={"max_new_tokens": 6}) == edited_answers
    # an earlier state loads as itself (its path is replayed, not the champion's)
    first = mlflow.pyfunc.load_model(f"models:/{reg.name}/{reg.version_of(states[0].id).version}")
    assert first.predict(answer_prompts, params={"max_new_tokens": 6}) == states_answers(stored_lm, store, states[0].id)

    # rollback to base: champion now loads the base model itself, through the same pyfunc, bit for bit
    ops.rollback(workspace, store, None, by="bob", reason="regressed", params=NO_DVC)
    champ = reg.alias("champion")
    assert champ.tags["kedit.state_id"] == "base" and champ.source.startswith("models:/")
    model = mlflow.pyfunc.load_model(f"models:/{reg.name}@champion")
    assert model.predict(answer_prompts, params={"max_new_tokens": 6}) == base_answers
    from kedit.lineage.store import _Model

    served = model.unwrap_python_model().lm
    assert _Model(served).digest() == _Model(stored_lm()).digest()  # every weight is the base model's
    assert len(tr.client.search_runs([tr.experiment_id], "tags.`kedit.kind` = 'base-model'")) == 1  # no 2nd copy
    n = len(reg.versions())
    ops.rollback(workspace, store, None, by="bob", reason="again", params=NO_DVC)
    assert len(reg.versions()) == n and reg.alias("champion").version == champ.version


@pytest.fixture
def states_answers(greedy_answers, answer_prompts):
    """``states_answers(stored_lm, store, sid)``: the greedy answers of state ``sid`` on a fresh model."""
    def answers(stored_lm, store, sid):
        lm = stored_lm()
        store.materialise(sid, lm)
        return greedy_answers(lm, answer_prompts)

    return answers


def test_state_without_its_base_model_is_refused(workspace, tiny_lm, monkeypatch, fabricate):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from kedit.lineage import LineageError
    from kedit.lineage.registry import Tracking, log_state_model

    store = LineageStore(workspace.lineage_dir)
    res = fabricate(tiny_lm, None, seed=0, rows=["r0"])
    s = store.commit(tiny_lm, res, parent=None, feed={"row_ids": ["r0"]}, hparams={})  # before applying it
    with pytest.raises(LineageError, match="not in .*model store"):
        log_state_model(Tracking(workspace), store, s)


def test_refresh_logs_every_candidate_and_registers_the_logged_model(workspace, stored_lm, monkeypatch,
                                                                     tmp_path, commit_states):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # lineage params from the (absent) workspace params.yaml: defaults
    from kedit import refresh
    from kedit.lineage.registry import TAG_GATE, find_state_model
    from kedit.lineage.runlog import RunLog, log_candidate_model
    from kedit.progress import ProgressTail

    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    failed, passed = commit_states(store, stored_lm(), 2)
    runlog = RunLog(workspace, "k1")
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    for sid, ok in ((failed.id, False), (passed.id, True)):
        (gate_dir / "gate.json").write_text(json.dumps({"passed": ok, "checks": []}))
        log_candidate_model(workspace, store, sid, runlog, gate_dir)
    assert find_state_model(runlog.tracking, failed.id).tags[TAG_GATE] == "failed"  # logged, not registered
    tail = ProgressTail(workspace.root)
    out = refresh.register_step(workspace, "k1", passed.id)
    assert out["source"] == find_state_model(runlog.tracking, passed.id).model_uri and out["version"] == "1"
    assert [x.split(" ", 1)[1].split(" in ")[0] for x in tail.new_lines()] == ["register: started", "register: done"]
    # the refresh's run goes on after registration (approval, promotion log into it later)
    assert runlog.client.get_run(runlog.parent_id).info.status == "RUNNING"


def test_base_version_from_before_is_kept_and_a_loadable_one_registered(workspace, stored_lm, monkeypatch,
                                                                        tmp_path, answer_prompts,
                                                                        greedy_answers):
    """A base version whose source is a plain folder (not loadable) is not reused as champion's target."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    from kedit.lineage.registry import TAG_BASE, TAG_STATE, ModelRegistry, Tracking

    lm = stored_lm()
    base_hash = lm.manifest.model_hash
    reg = ModelRegistry(Tracking(workspace), "tiny-llama")
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "base.json").write_text(json.dumps({"state": None, "base_model_hash": base_hash}))
    old = reg.client.create_model_version(reg.name, source=folder.as_uri(), tags={TAG_STATE: "base",
                                                                                 TAG_BASE: base_hash})
    mv = reg.register_base("tiny-llama", base_hash)
    assert mv.version != old.version and mv.source.startswith("models:/")
    assert reg.register_base("tiny-llama", base_hash).version == mv.version  # idempotent per hash
    model = mlflow.pyfunc.load_model(f"models:/{reg.name}/{mv.version}")
    assert model.predict(answer_prompts, params={"max_new_tokens": 6}) == greedy_answers(lm, answer_prompts)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_logged_model_carries_its_code_and_serves_with_mlflow_models_serve(workspace, stored_lm, monkeypatch,
                                                                           tmp_path, commit_states,
                                                                           greedy_answers, answer_prompts,
                                                                           gate_and_approve):
    """The registered champion serves on its own: kedit's code inside the model, requirements without
    local version tags, an input example; `mlflow models serve` answers /invocations with the edit."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow

    from kedit.lineage.registry import ModelRegistry, Tracking

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    (state,) = commit_states(store, lm, 1)
    edited = greedy_answers(lm, answer_prompts)
    tr = Tracking(workspace)
    ops.register_candidate(workspace, store, state.id, params=NO_DVC)
    gate_and_approve(store, state)
    ops.promote(workspace, store, state.id, by="alice", params=NO_DVC)
    uri = f"models:/{ModelRegistry(tr, 'tiny-llama').name}@champion"

    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    reqs = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in reqs) and not [r for r in reqs if "+" in r]  # no local tags
    assert (local / "code" / "kedit" / "lineage" / "mlflow_model.py").exists()  # kedit travels with it
    assert not list((local / "code").rglob("__pycache__"))
    info = mlflow.models.get_model_info(uri)
    assert info.saved_input_example_info is not None
    assert "Eiffel" in (local / info.saved_input_example_info["artifact_path"]).read_text()

    port = free_port()
    venv_bin = Path(sys.executable).parent  # mlflow starts `uvicorn` by name: the venv's bin must be on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tr.uri,
           "PATH": os.pathsep.join([str(venv_bin), os.environ.get("PATH", "")])}
    server = subprocess.Popen([str(venv_bin / "mlflow"), "models", "serve", "-m", uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow models serve did not answer /ping in 240 s"
            time.sleep(1)
        body = json.dumps({"inputs": answer_prompts, "params": {"max_new_tokens": 6}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert json.loads(r.read())["predictions"] == edited
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_model_version_shows_the_review_and_candidate_alias_goes(workspace, stored_lm, monkeypatch, tmp_path,
                                                                 commit_states):
    """Approver, time, comment, gate verdict and a link to the gate report on the version; the
    ``candidate`` alias leaves a version once it is promoted or rejected."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    from kedit.lineage.registry import (
        TAG_GATE_REPORT,
        TAG_REVIEW,
        TAG_REVIEW_COMMENT,
        TAG_REVIEWED_AT,
        TAG_REVIEWER,
        ModelRegistry,
        Tracking,
        log_state_model,
    )

    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    first, second = commit_states(store, stored_lm(), 2)
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    (gate_dir / "gate.json").write_text(json.dumps({"passed": True, "checks": []}))
    (gate_dir / "gate.md").write_text("# Promotion gate: PASSED\n")
    tr = Tracking(workspace)
    log_state_model(tr, store, first, gate_dir=gate_dir)
    ops.register_candidate(workspace, store, first.id, params=NO_DVC)
    reg = ModelRegistry(tr, "tiny-llama")
    assert reg.alias("candidate").tags["kedit.state_id"] == first.id
    store.record_gate(first.id, {"passed": True}, against=None)
    ev = ops.approve(store, first.id, by="alice", comment="facts checked", ws=workspace)
    ops.promote(workspace, store, first.id, by="alice", params=NO_DVC)
    v = reg.version_of(first.id)
    assert (v.tags[TAG_REVIEW], v.tags[TAG_REVIEWER], v.tags[TAG_REVIEW_COMMENT]) == ("approved", "alice",
                                                                                      "facts checked")
    assert v.tags[TAG_REVIEWED_AT] == ev.at and v.tags["kedit.gate"] == "passed"
    assert "**Gate: PASSED**" in v.description and "**Approved** by alice" in v.description
    assert v.tags[TAG_GATE_REPORT] in v.description
    report = mlflow.artifacts.download_artifacts(v.tags[TAG_GATE_REPORT], dst_path=str(tmp_path / "r"))
    assert "PASSED" in Path(report).read_text()
    assert reg.alias("candidate") is None and reg.alias("champion").version == v.version  # promoted

    ops.register_candidate(workspace, store, second.id, params=NO_DVC)
    assert reg.alias("candidate").tags["kedit.state_id"] == second.id
    ops.reject(workspace, store, second.id, by="bob", comment="wrong source")
    v2 = reg.version_of(second.id)
    assert (v2.tags[TAG_REVIEW], v2.tags[TAG_REVIEWER]) == ("rejected", "bob")
    assert "**Rejected** by bob" in v2.description and "**Gate: not recorded**" in v2.description
    assert reg.alias("candidate") is None and reg.alias("champion").version == v.version


def test_a_tracking_server_that_is_down_is_named_and_nothing_changes(workspace, stored_lm, monkeypatch,
                                                                     commit_states):
    from kedit.lineage import LineageError
    from kedit.lineage.registry import Tracking
    from kedit.orchestration import free_port

    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    (state,) = commit_states(store, stored_lm(), 1)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(LineageError, match=f"MLflow tracking server {dead} is not answering"):
        Tracking(workspace)
    n = len(store.events())
    with pytest.raises(LineageError, match="not answering"):
        ops.reject(workspace, store, state.id, by="bob", comment="no")
    with pytest.raises(LineageError, match="not answering"):
        ops.approve(store, state.id, by="bob", ws=workspace)
    assert len(LineageStore(workspace.lineage_dir).events()) == n  # no event recorded
