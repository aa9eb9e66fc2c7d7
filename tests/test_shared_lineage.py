"""The shared lineage without servers: two workspaces synchronised through a git remote (a plain path,
created by the first workspace) and a DVC remote folder; what a writer outside the lock gets; an
unreachable lock database is named. The same code on real servers: tests/test_shared_stack.py."""

from __future__ import annotations

import pytest

from kedit.lineage import ops
from kedit.lineage.shared import Shared, pull, section
from kedit.lineage.state import LineageError
from kedit.workspace import Workspace
from tests.test_lineage import gate_and_approve, run_batches, stored_lm  # noqa: F401  (fixture re-export)

DVC_ONLY = {"mlflow": False, "dvc": True, "snapshot_every": 20, "model_prefix": "kedit", "dvc_remote": None}


@pytest.fixture
def shared(tmp_path, monkeypatch):
    monkeypatch.delenv("KEDIT_LOCK_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KEDIT_GIT_REMOTE", str(tmp_path / "remote" / "lineage.git"))  # does not exist yet
    monkeypatch.setenv("KEDIT_DVC_REMOTE", str(tmp_path / "remote" / "dvc"))
    return Shared.from_env()


def test_two_workspaces_share_the_lineage_through_the_remotes(workspace, stored_lm, shared, tmp_path):  # noqa: F811
    a = workspace
    with section(a, "edit"):
        store_a = ops.open_store(a, DVC_ONLY)
        (s1,) = run_batches(store_a, stored_lm(), 1)
        gate_and_approve(store_a, s1)
    assert (tmp_path / "remote" / "lineage.git" / "HEAD").exists()

    b = Workspace(tmp_path / "b")
    with section(b, "promote"):
        store_b = ops.open_store(b, DVC_ONLY)
        assert [s.id for s in store_b.states()] == [s1.id]  # came through git + DVC, not from A's folder
        ops.promote(b, store_b, s1.id, by="bob", params=DVC_ONLY)
    assert pull(a, shared) is True
    assert ops.open_store(a, DVC_ONLY).champion() == s1.id
    assert pull(a, shared) is False  # nothing new

    # `kedit lineage approve` in a third, fresh workspace: cloned, recorded and published in one section
    from kedit.cli import main

    assert main(["-w", str(tmp_path / "c"), "lineage", "approve", s1.id[:12], "--by", "carol"]) == 0
    assert pull(a, shared) is True
    assert any(e.type == "approve" and e.by == "carol" for e in ops.open_store(a, DVC_ONLY).events())

    # a write outside the lock while the shared lineage moves on: refused by name, nothing changed
    ops.open_store(a, DVC_ONLY).reject(s1.id, by="outside-the-lock")
    with section(b, "rollback"):
        ops.rollback(b, ops.open_store(b, DVC_ONLY), "base", by="bob", reason="test", params=DVC_ONLY)
    head = (a.root / ".git" / "HEAD").read_text()
    n = len(ops.open_store(a, DVC_ONLY).events())
    with pytest.raises(LineageError, match="not published"):
        pull(a, shared)
    assert len(ops.open_store(a, DVC_ONLY).events()) == n and (a.root / ".git" / "HEAD").read_text() == head


def test_an_unreachable_lock_database_is_named_and_nothing_changes(workspace, stored_lm, shared,  # noqa: F811
                                                                   monkeypatch):
    pytest.importorskip("psycopg2")
    from kedit.orchestration.stack import free_port

    store = ops.open_store(workspace, DVC_ONLY)
    (s1,) = run_batches(store, stored_lm(), 1)
    gate_and_approve(store, s1)
    monkeypatch.setenv("KEDIT_LOCK_URL", f"postgresql://kedit:x@127.0.0.1:{free_port()}/kedit")
    with pytest.raises(LineageError, match=r"PostgreSQL at 127\.0\.0\.1:\d+/kedit \(KEDIT_LOCK_URL\) is unreachable"):
        ops.promote(workspace, store, s1.id, by="bob", params=DVC_ONLY)
    assert store.champion() is None and not (workspace.root / ".git").exists()
