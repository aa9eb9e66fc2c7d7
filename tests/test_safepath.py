"""Nothing kedit writes, adds or deletes resolves outside the workspace through a link or onto its own
stores (kedit.safepath): DVC versioning, export, reports, feed quarantine."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from kedit.lineage import LineageStore, ops
from kedit.safepath import UnsafePathError, check_target
from tests.test_lineage import gate_and_approve, run_batches, stored_lm  # noqa: F401  (fixture)


@pytest.fixture
def workspace(tmp_path):
    """The workspace in a folder of its own, so tmp_path / "elsewhere" is outside it."""
    from kedit.workspace import Workspace

    return Workspace(tmp_path / "ws")


OFF = {"mlflow": False, "dvc": False, "snapshot_every": 2, "model_prefix": "kedit", "dvc_remote": None}


def _outside(tmp_path: Path) -> Path:
    f = tmp_path / "elsewhere" / "file.txt"
    f.parent.mkdir()
    f.write_text("not the workspace's\n")
    os.chmod(f, 0o640)
    return f


@pytest.fixture
def promoted(workspace, stored_lm):  # noqa: F811
    """A workspace with a stored base model and one promoted state (no MLflow, no DVC yet)."""
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    (s1,) = run_batches(store, lm, 1)
    gate_and_approve(store, s1)
    ops.promote(workspace, store, s1.id, by="alice", params=OFF)
    return store, s1


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_rollback_refuses_to_dvc_add_a_link_out_of_the_workspace(workspace, promoted, tmp_path):
    store, s1 = promoted
    outside = _outside(tmp_path)
    link = workspace.lineage_dir / "notes.txt"
    link.symlink_to(outside)
    with pytest.raises(UnsafePathError) as err:
        ops.rollback(workspace, store, None, by="bob", reason="regression", params={**OFF, "dvc": True})
    assert f"{link} -> {outside}" in str(err.value) and "symbolic link" in str(err.value)
    # refused before anything moved: no event, the outside file untouched, nothing pushed
    assert store.champion() == s1.id and ops.pending_report(store) is None
    assert link.is_symlink() and stat.S_IMODE(outside.stat().st_mode) == 0o640
    assert outside.stat().st_nlink == 1
    remote = workspace.root / ".dvc-remote"
    assert not remote.exists() or not any(p.is_file() for p in remote.rglob("*"))
    link.unlink()  # without the link the same rollback goes through
    ops.rollback(workspace, store, None, by="bob", reason="regression", params={**OFF, "dvc": True})
    assert store.champion() is None


def test_export_refuses_an_out_that_is_a_link(workspace, promoted, tmp_path):
    store, s1 = promoted
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    link = tmp_path / "served"
    link.symlink_to(real)
    with pytest.raises(UnsafePathError, match=f"export --out: {link} is a symbolic link to {real}"):
        ops.export(workspace, store, s1.id, link, force=True)
    assert (real / "keep.txt").read_text() == "mine" and link.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if "exporting" in p.name] == []


@pytest.mark.parametrize("where", ["lineage", "lineage/states", "models", ".", "..", ".git"])
def test_export_refuses_to_replace_the_workspace_or_its_stores(workspace, promoted, where):
    store, s1 = promoted
    before = sorted(p.name for p in workspace.lineage_dir.iterdir())
    with pytest.raises(UnsafePathError, match="export --out: .*(own store|the workspace)"):
        ops.export(workspace, store, s1.id, workspace.root / where, force=True)
    assert sorted(p.name for p in workspace.lineage_dir.iterdir()) == before
    assert store.verify(deep=False).ok


def test_export_mode_and_no_leftovers_on_failure(workspace, promoted, tmp_path, monkeypatch):
    """Every exported file is readable under the umask (save_pretrained writes 0600); a failure leaves
    neither a temporary folder nor a damaged earlier export."""
    store, s1 = promoted
    out = ops.export(workspace, store, s1.id, tmp_path / "served")
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    import kedit.atomic

    def boom(folder):
        raise OSError("disk full")

    monkeypatch.setattr(kedit.atomic, "make_readable", boom)
    with pytest.raises(OSError, match="disk full"):
        ops.export(workspace, store, None, out, force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_reports_and_quarantine_do_not_follow_a_link_out(workspace, tmp_path):
    from kedit.feeds.champion import ingest_for_champion
    from kedit.lineage.gate import gate_report_dir
    from kedit.refresh import reports_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    workspace.root.mkdir()
    workspace.root.joinpath("reports").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="leading out of the workspace"):
        reports_dir(workspace, "k1")
    with pytest.raises(UnsafePathError, match="leading out of the workspace"):
        gate_report_dir(workspace, "ab" * 32)
    assert list(elsewhere.iterdir()) == []
    workspace.feeds_dir.mkdir()
    (workspace.feeds_dir / "quarantine").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError, match="quarantine is a symbolic link"):
        ingest_for_champion(workspace, workspace.feeds_dir / "2025-01-02.jsonl")


def test_feed_validate_does_not_write_quarantine_through_a_link(workspace, tmp_path, capsys):
    from kedit.cli import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    workspace.feeds_dir.mkdir(parents=True)
    (workspace.feeds_dir / "quarantine").symlink_to(elsewhere)
    feed = tmp_path / "2025-01-02.jsonl"
    row = {"id": "a", "subject": "S", "prompt": "no slot", "target_new": "P", "source": "t",
           "observed_at": "2025-01-02T03:04:05Z"}  # quarantined: the prompt has no {}
    feed.write_text(json.dumps(row) + "\n")
    assert main(["-w", str(workspace.root), "feed", "validate", str(feed)]) != 0
    assert "feed validate: " in capsys.readouterr().err and list(elsewhere.iterdir()) == []


def test_check_target_allows_what_the_user_names_outside(workspace, tmp_path):
    """A real path outside the workspace is the user's to name; inside, reports/ and exports/ are fine."""
    assert check_target(tmp_path / "out" / "model", workspace, "x") == (tmp_path / "out" / "model").resolve()
    assert check_target(workspace.root / "exports" / "m", workspace, "x", within=workspace.root)
    with pytest.raises(UnsafePathError, match="outside"):
        check_target(tmp_path / "out", workspace, "x", within=workspace.root)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_a_dvc_remote_inside_a_store_is_refused(workspace, tmp_path):
    from kedit.lineage.versioning import Versioning

    workspace.lineage_dir.mkdir(parents=True)
    with pytest.raises(UnsafePathError, match="lineage.dvc_remote: .*own store"):
        Versioning(workspace, remote=str(workspace.lineage_dir / "remote")).ensure()
    assert not (workspace.lineage_dir / "remote").exists()
