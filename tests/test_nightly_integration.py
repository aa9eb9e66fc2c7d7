"""End to end: a real Prefect server and process workers on 127.0.0.1, a real MLflow SQLite store, a
real DVC repo, the real embedded SmolLM2, a tiny feed. Approve through the API, check the champion,
roll back; re-run the same feed (nothing new); a rejected refresh leaves the champion unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]

FEED = [
    {"id": "t-001", "subject": "Eiffel Tower", "prompt": "{} is located in the city of", "target_new": "Rome",
     "target_true": "Paris", "paraphrases": ["The Eiffel Tower stands in the city of"],
     "neighbors": ["The Colosseum is located in the city of"], "source": "test",
     "observed_at": "2026-01-05T08:00:00Z"},
    {"id": "t-002", "subject": "Barack Obama", "prompt": "{} was born in the state of", "target_new": "Texas",
     "target_true": "Hawaii", "paraphrases": ["Barack Obama's birthplace is the state of"],
     "neighbors": ["Abraham Lincoln was born in the state of"], "source": "test",
     "observed_at": "2026-01-05T08:00:00Z"},
]
FEED_2 = [
    {"id": "u-001", "subject": "Mount Everest", "prompt": "{} is located in the country of",
     "target_new": "Chile", "target_true": "Nepal", "source": "test", "observed_at": "2026-01-06T08:00:00Z"},
]


def _write_feed(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def stack_ws(smollm_ws, tmp_path_factory):
    """A fresh workspace sharing the imported model (hard links), small statistics budget."""
    from kedit.workspace import Workspace

    root = tmp_path_factory.mktemp("nightly")
    ws = Workspace(root)
    src = smollm_ws.model_dir("smollm2-135m")
    dst = ws.model_dir("smollm2-135m")
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["stats"]["max_tokens"] = 12_000  # enough for a working projector on a 2-core CI machine
    params["stats"]["batch_size"] = 8
    params.setdefault("refresh", {}).update(trace_sample=1, trace_noise_samples=2)
    # the same checks, on less text: keeps the gate to about a minute on a 2-core CI machine
    params["gates"].update(fluency_prompts=2, fluency_tokens=40, reference_tokens=1024)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return ws


def test_nightly_refresh_approve_rollback_rerun_reject(stack_ws, monkeypatch):
    from kedit.lineage.ops import open_store
    from kedit.lineage.registry import ModelRegistry, Tracking
    from kedit.orchestration import LocalStack, PrefectAPIError, expire_overdue, state_type

    ws = stack_ws
    monkeypatch.setenv("KEDIT_PARAMS", str(ws.root / "params.yaml"))
    _write_feed(ws.feeds_dir / "2026-01-05.jsonl", FEED)
    _write_feed(ws.feeds_dir / "2026-01-06.jsonl", FEED_2)
    stack = LocalStack(home=ws.root / ".stack", project_dir=ROOT, workspace=ws.root, params=ws.root / "params.yaml")
    try:
        api = stack.start()
        # 1. the nightly refresh runs on the cpu pool, its model work on the gpu pool, then suspends
        run = api.run_deployment("nightly-refresh/nightly", {"feed": "2026-01-05", "workspace": str(ws.root)})
        fr = api.wait(run.id, ("PAUSED",), timeout=1500)
        assert state_type(fr) == "PAUSED", _logs(stack, fr)
        waiting = api.awaiting_approval()
        assert len(waiting) == 1
        sid = waiting[0].state_ref
        store = open_store(ws)
        full = store.resolve(sid)
        assert store.champion() is None  # nothing promoted before the approval
        gate = json.loads(next(ws.reports_dir.glob("*/gate/gate.json")).read_text())
        assert gate["passed"] is True and gate["checks"]
        reg = ModelRegistry(Tracking(ws), "smollm2-135m", prefix="kedit")
        assert reg.alias("candidate").tags["kedit.state_id"] == full

        # 2. approve through the API (what `kedit approve` does); the run resumes from cached results.
        # (A resume within a second of the suspension crashed Prefect 3.8's process worker; not re-checked
        # on the pinned 3.9. A reviewer takes longer than that.)
        time.sleep(10)
        api.decide(sid, True, "integration-test", "looks right")
        fr = api.wait(run.id, timeout=900)  # until final: Prefect's wait_for_flow_run
        assert state_type(fr) == "COMPLETED", _logs(stack, fr)
        store = open_store(ws)
        assert store.champion() == full
        champ = reg.alias("champion")
        assert champ.tags["kedit.state_id"] == full
        approvals = [e for e in store.events() if e.type in ("approve", "promote") and e.state == full]
        assert approvals and approvals[0].by == "integration-test"
        st = store.get(full)
        assert st.n_edits == 2 and st.predictions
        assert "Rome" in " ".join(st.predictions.values())
        assert (ws.root / ".git").exists() and "kedit/state/" in _git(ws, "tag")
        # the reviewer's view: the version says who approved it and links its gate report; no longer a
        # candidate; the runs are named by the feed's date; kedit's step logs and the gate report are in Prefect
        from kedit.lineage.registry import TAG_GATE_REPORT, TAG_REVIEWER

        assert champ.tags[TAG_REVIEWER] == "integration-test" and champ.tags[TAG_GATE_REPORT] in champ.description
        assert reg.alias("candidate") is None
        assert fr.name == "nightly-2026-01-05"
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            LogFilter,
            LogFilterFlowRunId,
        )

        with api.client("test") as c:
            (gpu,) = [r for r in c.read_flow_runs() if r.name == "edits-2026-01-05"]
            logs = " ".join(x.message for x in c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[gpu.id]))))
            kinds = {a.type for a in c.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["gate-report", "feed-facts"])))}
        assert "edit: started" in logs and "gate: done" in logs, logs[-2000:]
        assert kinds == {"markdown", "table"}

        # 3. the same feed again: nothing new is applied, the champion stays
        run2 = api.run_deployment("nightly-refresh/nightly", {"feed": "2026-01-05", "workspace": str(ws.root)})
        fr2 = api.wait(run2.id, ("PAUSED",), timeout=600)
        assert state_type(fr2) == "COMPLETED", _logs(stack, fr2)
        assert len(open_store(ws).states()) == 1

        # 4a. a second feed whose approval times out: the suspended run is past its deadline, the sweep
        # (`kedit nightly expire`, also the first task of every nightly run) rejects it; champion unchanged
        run3 = api.run_deployment("nightly-refresh/nightly", {"feed": "2026-01-06", "workspace": str(ws.root),
                                                             "approval_timeout_s": 5})
        fr3 = api.wait(run3.id, ("PAUSED",), timeout=1500)
        assert state_type(fr3) == "PAUSED", _logs(stack, fr3)
        time.sleep(6)
        # past the deadline the run is either still waiting or already failed by the Prefect server's own
        # pause-expiration service (every 5 s); the sweep must see it either way
        late = api.timed_out_approvals()
        assert [r.id for r in late] == [str(run3.id)]
        with pytest.raises(PrefectAPIError, match="timed out"):
            api.decide(late[0].state_ref, True, "late-reviewer")
        expired = expire_overdue(api, open_store(ws))
        assert len(expired) == 1 and expired[0].startswith(late[0].state_ref)
        assert state_type(api.flow_run(run3.id)) == "FAILED"
        assert expire_overdue(api, open_store(ws)) == []  # recorded once
        store = open_store(ws)
        assert store.champion() == full
        timed_out = [e for e in store.events() if e.type == "reject" and e.by == "kedit-timeout"]
        assert len(timed_out) == 1
        sid3 = timed_out[0].state

        # 4b. the same feed again, now rejected by a human: the edit comes back from the cache (same
        # candidate state, no new edit), the champion and its alias stay
        n_states = len(store.states())
        run4 = api.run_deployment("nightly-refresh/nightly", {"feed": "2026-01-06", "workspace": str(ws.root)})
        fr4 = api.wait(run4.id, ("PAUSED",), timeout=900)
        assert state_type(fr4) == "PAUSED", _logs(stack, fr4)
        assert api.awaiting_approval()[0].state_ref == sid3[:16]
        time.sleep(10)
        api.decide(sid3[:12], False, "integration-test", "not today")
        fr4 = api.wait(run4.id, ("COMPLETED",), timeout=900)
        assert state_type(fr4) == "COMPLETED", _logs(stack, fr4)
        store = open_store(ws)
        assert len(store.states()) == n_states
        assert store.champion() == full
        assert any(e.type == "reject" and e.by == "integration-test" and e.state == sid3 for e in store.events())
        assert reg.alias("champion").tags["kedit.state_id"] == full
        assert store.get(sid3).parent == full  # the rejected candidate branched from the champion

        # 5. roll back to the base model through the rollback deployment
        run5 = api.run_deployment("rollback/rollback", {"state": "base", "by": "integration-test",
                                                         "reason": "test rollback", "workspace": str(ws.root)})
        fr5 = api.wait(run5.id, timeout=300)
        assert state_type(fr5) == "COMPLETED", _logs(stack, fr5)
        store = open_store(ws)
        assert store.champion() is None
        assert any(e.type == "rollback" and e.comment == "test rollback" for e in store.events())
        versions = reg.versions()
        assert len(versions) >= 2  # rollback moves aliases, never deletes versions
    finally:
        stack.stop()
    assert all(p.poll() is not None for p in stack.procs.values())


def _git(ws, *args) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=ws.root, capture_output=True, text=True).stdout


def _logs(stack, fr) -> str:
    tail = []
    for name in ("worker-cpu", "worker-gpu"):
        p = stack.home / f"{name}.log"
        if p.exists():
            tail.append(f"--- {name} ---\n" + p.read_text()[-6000:])
    return f"flow run {fr.name} ended {fr.state}\n" + "\n".join(tail)

