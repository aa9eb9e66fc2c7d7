"""A workspace is portable: nothing it stores names its own absolute path, so a copy works on its own
(the original hidden) and never reads or writes the original (the original present)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from kedit.editors.base import apply_deltas
from kedit.lineage import LineageError, LineageStore, ops
from kedit.models.store import load_model
from kedit.workspace import Workspace
from tests.test_lineage import fabricate, stored_lm  # noqa: F401  (fixture re-export)
from tests.test_lineage_mlflow_model import PROMPTS, commit_states, greedy

WITH_DVC = {"mlflow": True, "dvc": True, "snapshot_every": 2, "model_prefix": "kedit", "dvc_remote": None}


@pytest.fixture
def workspace(tmp_path):
    return Workspace(tmp_path / "orig")


def mentions(root: Path, needle: str) -> list[str]:
    """Files under ``root`` (and rows of its mlflow.db) whose bytes contain ``needle``."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and ".git" not in p.relative_to(root).parts[:1]:
            if p.name == "mlflow.db":
                con = sqlite3.connect(p)
                for (table,) in con.execute("select name from sqlite_master where type='table'"):
                    for row in con.execute(f"select * from {table}"):
                        if any(needle in str(c) for c in row):
                            hits.append(f"mlflow.db:{table}: {row}")
                con.close()
            elif needle.encode() in p.read_bytes():
                hits.append(str(p.relative_to(root)))
    return hits


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_dir()}


def champion_answers() -> list[str]:
    import mlflow

    model = mlflow.pyfunc.load_model("models:/kedit-tiny-llama@champion")
    return model.predict(PROMPTS, params={"max_new_tokens": 6})


def build(ws: Workspace, stored_lm) -> tuple[LineageStore, list, list[str]]:  # noqa: F811
    """Two states, the second gated (report in reports/), logged, registered and promoted with git + DVC."""
    from kedit.lineage.registry import Tracking, log_state_model

    store = LineageStore(ws.lineage_dir, snapshot_every=2)
    states = commit_states(store, stored_lm(), 2)
    gate_dir = ws.reports_dir / "k1" / "gate"
    gate_dir.mkdir(parents=True)
    (gate_dir / "gate.json").write_text(json.dumps({"passed": True, "checks": []}))
    (gate_dir / "gate.md").write_text("# Promotion gate: PASSED\n")
    store.record_gate(states[1].id, {"passed": True}, against=states[0].id, report=ws.rel(gate_dir))
    store.approve(states[1].id, by="alice")
    tr = Tracking(ws)
    with tr.run("nightly") as run:
        log_state_model(tr, store, states[1], run_id=run.info.run_id, gate_dir=gate_dir)
        ops.register_candidate(ws, store, states[1].id, run_id=run.info.run_id, params=WITH_DVC)
    ops.promote(ws, store, states[1].id, by="alice", params=WITH_DVC)
    return store, states, greedy(stored_lm_with(store, stored_lm, states[1].id), PROMPTS)


def stored_lm_with(store, stored_lm, sid):  # noqa: F811
    lm = stored_lm()
    store.materialise(sid, lm)
    return lm


def test_copied_workspace_works_alone_and_leaves_the_original_untouched(workspace, stored_lm, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    from kedit.lineage.registry import Tracking
    from kedit.lineage.versioning import Versioning

    orig = workspace
    store, states, edited = build(orig, stored_lm)
    assert champion_answers() == edited
    # nothing the workspace stores names the folder it lies in: MLflow's store, .dvc/config, lineage, reports
    assert mentions(orig.root, str(orig.root)) == []
    assert Versioning(orig).configured_remote() == "../.dvc-remote"

    copy = Workspace(tmp_path / "copy")
    shutil.copytree(orig.root, copy.root, symlinks=True)

    # the original hidden: the copy's champion loads through MLflow on its own
    hidden = orig.root.with_name("orig-hidden")
    orig.root.rename(hidden)
    Tracking(copy)  # the process's tracking URI: the copy's store
    assert champion_answers() == edited
    hidden.rename(orig.root)

    # the original present: the copy reads and writes only itself (load, a new state, register, promote
    # with a DVC push, an override note in its gate report)
    before = tree(orig.root)
    Tracking(copy)
    assert champion_answers() == edited
    cstore = LineageStore(copy.lineage_dir, snapshot_every=2)
    lm = load_model("tiny-llama", copy)
    prev = cstore.materialise(states[1].id, lm)
    res = fabricate(lm, prev, seed=9, rows=["r9"], layers=(1, 2, 3))
    res.deltas = {k: 400 * v for k, v in res.deltas.items()}
    apply_deltas(lm.model, res.deltas)
    third = cstore.commit(lm, res, parent=states[1].id, feed={"row_ids": ["r9"], "path": "feeds/d9.jsonl"},
                          hparams={"method": "alphaedit"})
    # a failed gate whose report (recorded relative) gets the override note: in the copy's reports/
    cstore.record_gate(third.id, {"passed": False}, against=states[1].id, report="reports/k1/gate")
    ops.register_candidate(copy, cstore, third.id, params=WITH_DVC)
    ops.promote(copy, cstore, third.id, by="carol", params=WITH_DVC, override="test: no gate")
    assert champion_answers() == greedy(lm, PROMPTS) != edited
    assert tree(orig.root) == before  # not one file of the original changed, none added
    assert mentions(copy.root, str(orig.root)) == []
    assert "## Override" in (copy.root / "reports/k1/gate/gate.md").read_text()
    assert (copy.root / ".dvc-remote").is_dir() and any((copy.root / ".dvc-remote").rglob("*"))

    # and the original still loads its own champion
    Tracking(orig)
    assert champion_answers() == edited


def test_a_moved_workspace_with_absolute_mlflow_artifacts_is_refused_clearly(tmp_path, monkeypatch):
    """A workspace an older kedit made (absolute ``file://`` artifact location), copied elsewhere."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    from kedit.lineage.registry import EXPERIMENT, Tracking

    ws = Workspace(tmp_path / "copy")
    ws.root.mkdir()
    elsewhere = tmp_path / "orig" / "mlartifacts"
    MlflowClient(ws.mlflow_uri).create_experiment(EXPERIMENT, artifact_location=elsewhere.as_uri())
    with pytest.raises(LineageError, match=r"outside this workspace .*older kedit.*copied or moved"):
        Tracking(ws)
    own = Workspace(tmp_path / "own")
    own.root.mkdir()
    MlflowClient(own.mlflow_uri).create_experiment(EXPERIMENT, artifact_location=(own.root / "mlartifacts").as_uri())
    Tracking(own)  # in place: it still works


def test_an_old_absolute_dvc_remote_is_made_relative_or_refused(tmp_path):
    from kedit.lineage.versioning import Versioning

    ws = Workspace(tmp_path / "ws")
    v = Versioning(ws)
    v.ensure()
    assert v.configured_remote() == "../.dvc-remote"
    v.dvc("remote", "modify", "kedit", "url", str(ws.root / ".dvc-remote"))  # what an older kedit wrote
    v.git("commit", "-qam", "old")
    v.ensure()
    assert v.configured_remote() == "../.dvc-remote"
    other = tmp_path / "orig" / ".dvc-remote"
    v.dvc("remote", "modify", "kedit", "url", str(other))
    with pytest.raises(LineageError, match=r"another workspace's default remote"):
        v.ensure()
    assert not other.exists()


def test_mlflow_resolves_workspace_uris_whatever_is_imported_first(tmp_path):
    """MLflow registers the repository through the entry point even when kedit's module comes first."""
    import subprocess
    import sys

    code = ("import kedit.workspace_artifacts\n"
            "from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository\n"
            f"r = get_artifact_repository('kedit-workspace:/mlartifacts', tracking_uri='sqlite:///{tmp_path}/mlflow.db')\n"
            "print(r.artifact_dir)\n")
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "mlartifacts")


def test_workspace_uris_resolve_against_the_tracking_store_and_stay_inside(tmp_path, monkeypatch):
    from kedit.workspace_artifacts import (
        WorkspaceURIError,
        local_path,
        repository,
        sqlite_file,
        workspace_root,
    )

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEDIT_HOME", raising=False)
    assert sqlite_file(f"sqlite:///{tmp_path}/ws/mlflow.db") == tmp_path / "ws" / "mlflow.db"
    assert sqlite_file("sqlite:///rel/mlflow.db") == tmp_path / "rel" / "mlflow.db"  # relative to the cwd
    assert sqlite_file("http://mlflow:5000") is None
    uri = f"sqlite:///{tmp_path}/ws/mlflow.db"
    assert local_path("kedit-workspace:/mlartifacts/1/a", uri) == tmp_path / "ws" / "mlartifacts" / "1" / "a"
    with pytest.raises(WorkspaceURIError, match="outside the workspace"):
        local_path("kedit-workspace:/../elsewhere", uri)
    with pytest.raises(WorkspaceURIError, match="relative to a workspace's SQLite tracking store"):
        workspace_root("http://mlflow:5000")
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    assert workspace_root("http://mlflow:5000") == tmp_path / "home"
    (tmp_path / "ws" / "mlartifacts" / "x").mkdir(parents=True)
    (tmp_path / "ws" / "mlartifacts" / "x" / "f.txt").write_text("hi")
    repo = repository("kedit-workspace:/mlartifacts/x", tracking_uri=uri)
    assert Path(repo.download_artifacts("f.txt")).read_text() == "hi"  # read in place, no copy
    assert Path(repo.download_artifacts("f.txt")) == tmp_path / "ws" / "mlartifacts" / "x" / "f.txt"
