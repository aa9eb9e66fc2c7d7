"""Lineage with a real MLflow SQLite store and a real git + DVC repository with a local remote."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kedit.lineage import LineageStore, ops
from kedit.lineage.versioning import Versioning, state_tag
from tests.test_lineage import (  # noqa: F401  (fixture re-export)
    edited_hashes,
    gate_and_approve,
    run_batches,
    stored_lm,
)

NO_DVC = {"mlflow": True, "dvc": False, "snapshot_every": 2, "model_prefix": "kedit", "dvc_remote": None}


def test_mlflow_aliases_move_and_versions_stay(workspace, stored_lm, monkeypatch):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from kedit.lineage.registry import TAG_STATE, ModelRegistry, Tracking

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    tr = Tracking(workspace)
    assert tr.uri.startswith("sqlite:///") and (workspace.root / "mlflow.db").exists()
    with tr.run("nightly-2026-11-23", tags={"kedit.feed": "day0"}) as parent:
        with tr.child("edit", params={"method": "alphaedit"}) as child:
            states = run_batches(store, lm, 3)
            for s in states:
                ops.register_candidate(workspace, store, s.id, run_id=child.info.run_id, params=NO_DVC)
    got = tr.client.get_run(child.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # artifacts inside the workspace, under a workspace-relative URI (the workspace can move)
    assert got.info.artifact_uri.startswith("kedit-workspace:/mlartifacts/")
    from kedit.workspace_artifacts import local_path

    assert local_path(got.info.artifact_uri, tr.uri).is_relative_to(workspace.root / "mlartifacts")

    reg = ModelRegistry(tr, "tiny-llama")
    assert reg.name == "kedit-tiny-llama"
    assert [v.tags[TAG_STATE] for v in reg.versions()] == [s.id for s in states]
    assert reg.alias("candidate").tags[TAG_STATE] == states[-1].id
    assert reg.alias("champion") is None

    gate_and_approve(store, states[2])
    ops.promote(workspace, store, states[2].id, by="alice", comment="gate passed", params=NO_DVC)
    assert reg.alias("champion").tags[TAG_STATE] == states[2].id
    ops.rollback(workspace, store, states[0].id, by="bob", reason="regression", params=NO_DVC)
    assert reg.alias("champion").tags[TAG_STATE] == states[0].id
    assert store.champion() == states[0].id
    assert len(reg.versions()) == 3  # moved, never deleted
    # the registered version is an MLflow model holding the state's files, downloadable by alias
    import mlflow

    path = mlflow.artifacts.download_artifacts(f"models:/{reg.name}@champion", dst_path=str(workspace.root / "dl"))
    state_dir = __import__("pathlib").Path(path) / "artifacts" / "workspace" / "lineage" / "states" / states[0].id
    names = {p.name for p in state_dir.iterdir()}
    assert "MLmodel" in {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert {"state.json", "deltas.safetensors", "editor_meta.json", "editor_state.safetensors"} <= names
    # registering the same state again returns its version
    assert ops.register_candidate(workspace, store, states[1].id, params=NO_DVC).version == reg.versions()[1].version


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_dvc_tag_checkout_and_fresh_clone(workspace, stored_lm, tmp_path):  # noqa: F811
    lm = stored_lm()
    params = {**NO_DVC, "mlflow": False, "dvc": True}
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    v = Versioning(workspace)
    v.ensure()
    assert v.initialised and "kedit" in v.dvc("remote", "list")
    (s1,) = run_batches(store, lm, 1)
    gate_and_approve(store, s1)
    out1 = ops.promote(workspace, store, s1.id, by="alice", params=params)
    s2, s3 = run_batches(store, lm, 2, parent=s1.id, prev=store.editor_state(s1.id), seed0=10)
    gate_and_approve(store, s3)
    out3 = ops.promote(workspace, store, s3.id, by="alice", params=params)
    assert set(v.tags()) == {state_tag(s1.id), state_tag(s3.id)}
    assert out1["git_commit"] != out3["git_commit"] and out1["dvc_rev.lineage"] != out3["dvc_rev.lineage"]
    assert (workspace.root / "models.dvc").exists()

    # git checkout <tag> && dvc checkout: the lineage files of that promotion
    v.checkout(state_tag(s1.id))
    old = LineageStore(workspace.lineage_dir)
    assert [s.id for s in old.states()] == [s1.id] and old.champion() == s1.id
    assert old.verify().ok
    v.checkout("main")
    back = LineageStore(workspace.lineage_dir)
    assert [s.id for s in back.states()] == [s1.id, s2.id, s3.id] and back.champion() == s3.id

    # a fresh clone + dvc pull gets a store that verifies and restores bit-exactly
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(workspace.root), str(clone)], check=True)
    from kedit.models.store import load_model
    from kedit.workspace import Workspace

    cws = Workspace(clone)
    # the committed remote is relative (the clone's own .dvc-remote, which git does not carry): a clone
    # reads the data from a remote it is told about, here the original's in the clone's local config
    assert Versioning(cws).configured_remote() == "../.dvc-remote"
    Versioning(cws).dvc("remote", "modify", "--local", "kedit", "url", str(workspace.root / ".dvc-remote"))
    Versioning(cws).pull()
    cstore = LineageStore(cws.lineage_dir)
    assert cstore.verify().ok and cstore.champion() == s3.id
    fresh = load_model("tiny-llama", cws)
    cstore.materialise(s3.id, fresh)
    assert edited_hashes(fresh, s3.tensor_sha256) == s3.tensor_sha256
    # the store stays writable after DVC linked its files from the cache
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    lm2 = stored_lm()
    store.materialise(s3.id, lm2)
    run_batches(store, lm2, 1, parent=s3.id, prev=store.editor_state(s3.id), seed0=20)
    ops.rollback(workspace, store, s2.id, by="bob", reason="audit", params=params)
    assert store.verify().ok and state_tag(s2.id) in v.tags()


def test_tracking_leaves_the_process_environment_alone(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI, which Workspace.mlflow_uri reads first: one
    workspace's store must not become every later workspace's store in the same process."""
    import os

    from kedit.lineage.registry import Tracking
    from kedit.workspace import Workspace

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    Tracking(a)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert Tracking(b).uri.endswith(str(tmp_path / "b" / "mlflow.db"))


def test_dvc_yaml_declares_gate_metrics_plots_and_the_champion_artifact(workspace, stored_lm):  # noqa: F811
    """The project's dvc.yaml (its metrics, plots and artifacts; the stages need the demo's params) in a
    workspace: each promotion commits the champion's gate metrics, `dvc metrics diff` compares two state tags."""
    import json

    import yaml

    root = Path(__file__).resolve().parents[1]
    declared = yaml.safe_load((root / "dvc.yaml").read_text())
    (workspace.root / "dvc.yaml").parent.mkdir(parents=True, exist_ok=True)
    (workspace.root / "dvc.yaml").write_text(yaml.safe_dump({k: declared[k] for k in ("metrics", "plots", "artifacts")}))
    params = {**NO_DVC, "mlflow": False, "dvc": True}
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    s1, s2 = run_batches(store, stored_lm(), 2)
    for s, eff in ((s1, 0.9), (s2, 1.0)):
        store.record_gate(s.id, {"passed": True, "checks": [
            {"name": "efficacy", "value": eff, "threshold": 0.8, "passed": True},
            {"name": "retention", "value": None, "skipped": True}]}, against=s.parent)
        store.approve(s.id, by="alice")
        ops.promote(workspace, store, s.id, by="alice", params=params)
    v = Versioning(workspace)
    diff = json.loads(v.dvc("metrics", "diff", state_tag(s1.id), state_tag(s2.id), "--json"))
    assert diff["metrics/gate.json"]["gate.efficacy"] == {"old": 0.9, "new": 1.0, "diff": pytest.approx(0.1)}
    assert diff["metrics/gate.json"]["n_edits"]["new"] == s1.n_edits + s2.n_edits
    plots = json.loads(v.dvc("plots", "show", "--json"))
    assert "metrics/gate_checks.csv" in json.dumps(plots)
    from dvc.repo import Repo

    with Repo(str(workspace.root)) as repo:
        (arts,) = repo.artifacts.read().values()
    assert arts["champion"].path == "lineage" and arts["champion"].type == "model"
    # a rollback to the base model commits its metrics too
    ops.rollback(workspace, store, None, by="bob", reason="audit", params=params)
    got = json.loads((workspace.root / "metrics" / "gate.json").read_text())
    assert got == {"gate": {"passed": 0, "n_checks": 0}, "n_edits": 0, "state": "base"}
    assert "metrics/gate.json" in v.git("show", "--name-only", "--format=", state_tag("base"))
