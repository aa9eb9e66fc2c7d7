"""Gating a lineage state against its parent (kedit.lineage.gate, `kedit lineage gate`): a retraction goes
through gate -> approve -> promote without an override; a state whose gate fails is refused; the champion
and the base model are not gated."""

from __future__ import annotations

import json

import pytest

from kedit.lineage import LineageStore

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tpatcher_champion(workspace, stored_lm, tmp_path, tpatcher, commit_batches, gate_and_approve):
    """Two T-Patcher batches (eiffel, darrieux | yasuda), the second promoted to champion."""
    from kedit.editors.registry import get_editor

    lm = stored_lm()
    editor = get_editor("tpatcher", tpatcher.hp(), cache_dir=tmp_path)
    store = LineageStore(workspace.lineage_dir)
    s1, s2 = commit_batches(store, lm, lambda lm, reqs, es: editor.compute(lm, reqs, es, None),
                            [tpatcher.reqs[:2], tpatcher.reqs[2:]])
    gate_and_approve(store, s1)
    store.promote(s1.id, by="alice")
    gate_and_approve(store, s2)
    store.promote(s2.id, by="alice")
    return store, lm, s2


def test_retraction_is_gated_approved_and_promoted_without_force(workspace, stored_lm, tmp_path, capsys,
                                                                 tpatcher_champion, tpatcher):
    from kedit.cli import main
    from kedit.models.scoring import predicts_targets

    store, _, s2 = tpatcher_champion
    w = ["-w", str(workspace.root)]
    assert main([*w, "retract", "eiffel", "--by", "carol", "--reason", "source withdrawn"]) == 0
    out = capsys.readouterr().out
    new = LineageStore(workspace.lineage_dir).get("HEAD")
    assert new.parent == s2.id and f"gate it: kedit lineage gate {new.short}" in out
    # no verdict yet: promotion is refused (no --force)
    assert main([*w, "lineage", "promote", new.id[:10], "--by", "dave", "--no-mlflow", "--no-dvc"]) == 2
    assert "no gate verdict" in capsys.readouterr().err
    # the champion and the base model are not candidates
    assert main([*w, "lineage", "gate", "champion"]) == 2
    assert "is the champion already" in capsys.readouterr().err
    assert main([*w, "lineage", "gate", "base"]) == 2
    assert "base model has no parent" in capsys.readouterr().err

    assert main([*w, "lineage", "gate", new.id[:10], "--by", "dave"]) == 0
    out = capsys.readouterr().out
    report = workspace.reports_dir / f"state-{new.id[:16]}" / "gate"
    assert f"gate PASSED for {new.id[:12]} against its parent {s2.id[:12]}" in out and str(report / "gate.md") in out
    assert {"gate.json", "gate.md", "gate.png"} <= {p.name for p in report.iterdir()}
    rep = json.loads((report / "gate.json").read_text())
    checks = {c["name"]: c for c in rep["checks"]}
    # no new edits: the edit checks are skipped, and the retraction check asks that the object is gone
    for name in ("efficacy", "generalization", "specificity_drop", "free_generation"):
        assert checks[name]["skipped"] and checks[name]["detail"] == "no new edits"
    lm_parent, lm_new = stored_lm(), stored_lm()
    store.materialise(s2.id, lm_parent)
    store.materialise(new.id, lm_new)
    eiffel = {"prompt": tpatcher.reqs[0].prompt, "subject": tpatcher.reqs[0].subject,
              "target_new": tpatcher.reqs[0].target_new}
    assert predicts_targets(lm_new, [eiffel]) == [False]
    r = checks["retraction"]
    assert not r["skipped"] and r["passed"] and r["value"] == 1.0 and "eiffel" in r["detail"]
    assert predicts_targets(lm_parent, [eiffel]) == [True] and r["before"] == 0.0  # the edit had taken
    # a "retraction" that left the fact in place fails the check
    from kedit.evaluation.candidate import retraction_check

    kept = retraction_check(lm_parent, lm_parent, [{**eiffel, "id": "eiffel"}], 0.9)
    assert not kept.passed and kept.value == 0.0 and "STILL gives it" in kept.detail
    assert checks["retention"]["detail"].endswith("earlier edits still hold")  # darrieux and yasuda only
    assert any(c["against"] == "base" for c in rep["checks"])  # the drift gate against the base model
    assert rep["candidate_state"]["parent"] == s2.id and "retraction of eiffel" in rep["candidate_state"]["feed"]
    assert "retraction of eiffel by carol" in (report / "gate.md").read_text()
    # each side's perplexity and fluency are kept by state id: gated again, the parent's are read, not scored
    assert rep["scores"]["champion_given"] == [] and set(rep["scores"]["candidate"]) == {"perplexity",
                                                                                         "generation_entropy"}
    assert main([*w, "lineage", "gate", new.id[:10], "--by", "dave"]) == 0
    again = json.loads((report / "gate.json").read_text())
    assert sorted(again["scores"]["champion_given"]) == ["generation_entropy", "perplexity"]
    assert any("measured at its own gate" in n for n in again["notes"])
    c2 = {c["name"]: c for c in again["checks"]}
    for name in ("perplexity_increase_pct", "fluency_drop"):
        assert c2[name]["before"] == checks[name]["before"] and c2[name]["value"] == checks[name]["value"]
    ev = [e for e in LineageStore(workspace.lineage_dir).events() if e.type == "gate" and e.state == new.id][-1]
    assert ev.by == "dave" and ev.data["against"] == s2.id and ev.data["gate"]["passed"] is True
    assert ev.data["gate"]["retracted"] == ["eiffel"] and ev.data["report"] == f"reports/state-{new.id[:16]}/gate"  # relative
    # logged like the refresh's candidates: a loadable MLflow model with the gate verdict
    from kedit.lineage.registry import Tracking

    runs = Tracking(workspace).client.search_runs(
        [Tracking(workspace).experiment_id], filter_string=f"tags.`kedit.refresh` = 'state-{new.id[:16]}'")
    assert {r.data.tags.get("kedit.kind") for r in runs} >= {"lineage-gate"}
    assert any(r.data.tags.get("kedit.gate") == "passed" for r in runs)

    assert main([*w, "lineage", "approve", new.id[:10], "--by", "erin"]) == 0
    capsys.readouterr()
    assert main([*w, "lineage", "promote", new.id[:10], "--by", "erin", "--no-mlflow", "--no-dvc"]) == 0
    store = LineageStore(workspace.lineage_dir)
    assert store.champion() == new.id
    assert not [e for e in store.events() if e.type == "override"]


def test_failed_gate_is_recorded_and_refuses_promotion(workspace, stored_lm, capsys, run_batches,
                                                       gate_and_approve, fabricate):
    """A state whose edits did not take (a small random update claiming three facts) fails efficacy."""
    from kedit.cli import main
    from kedit.editors.base import apply_deltas

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)
    gate_and_approve(store, s1)
    store.promote(s1.id, by="alice")
    facts = [{"id": f"x{i}", "prompt": p, "subject": s, "target_new": t}
             for i, (p, s, t) in enumerate([("{} is located in", "The Eiffel Tower", " Tokyo"),
                                            ("{} speaks", "Danielle Darrieux", " guitar"),
                                            ("{} was created by", "Apple A5", " Madrid")])]
    res = fabricate(lm, store.editor_state(s1.id), 7, [f["id"] for f in facts])
    apply_deltas(lm.model, res.deltas)
    s2 = store.commit(lm, res, parent=s1.id, hparams={}, feed={"file_sha256": "f7", "path": "feeds/day7.jsonl",
                                                                "row_ids": [f["id"] for f in facts], "facts": facts})
    w = ["-w", str(workspace.root)]
    assert main([*w, "lineage", "gate", s2.id[:10], "--by", "dave", "--no-mlflow"]) == 1
    out = capsys.readouterr().out
    assert f"gate FAILED for {s2.id[:12]}" in out and "FAIL efficacy" in out and "next:" not in out
    assert not (workspace.root / "mlflow.db").exists()
    rep = json.loads((workspace.reports_dir / f"state-{s2.id[:16]}" / "gate" / "gate.json").read_text())
    assert rep["passed"] is False and set(rep["failed_ids"]) == {"x0", "x1", "x2"}
    assert "retraction" not in {c["name"] for c in rep["checks"]}
    # the free-generation check reads the three facts' greedy text: none begins with its new object
    fg = {c["name"]: c for c in rep["checks"]}["free_generation"]
    assert not fg["skipped"] and fg["value"] == 0.0 and not fg["passed"] and "paraphrases" in fg["detail"]
    assert main([*w, "lineage", "approve", s2.id[:10], "--by", "erin"]) == 0
    assert "FAILED" in capsys.readouterr().out  # "not promotable yet: gate verdict ... FAILED"
    assert main([*w, "lineage", "promote", s2.id[:10], "--by", "erin", "--no-mlflow", "--no-dvc"]) == 2
    assert "FAILED" in capsys.readouterr().err
    assert LineageStore(workspace.lineage_dir).champion() == s1.id


def test_memoir_retraction_gated_through_the_python_api(workspace, stored_lm, commit_batches, memoir):
    """The sparse memory's retraction: the gate records a verdict against the parent that the promotion
    rules count, and the retraction check finds the retracted object gone."""
    from kedit.editors.base import EditRequest
    from kedit.lineage.gate import gate_state
    from kedit.lineage.retract import retract

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    _, s2 = commit_batches(store, lm, lambda lm, rq, es: memoir.editor().compute(lm, rq, es, None),
                         [[EditRequest(**memoir.a)], [EditRequest(**memoir.b)]])
    new = retract(store, lm, s2.id, "a", by="dana", reason="wrong source")
    res = gate_state(workspace, store, new.id[:10], by="dave", mlflow=False)
    checks = {c["name"]: c for c in res.checks}
    assert res.state_id == new.id and res.parent == s2.id and res.retracted == ["a"]
    assert checks["retraction"]["value"] == 1.0 and "a: 'Tokyo'" in checks["retraction"]["detail"]
    assert checks["efficacy"]["skipped"]
    assert (res.report_dir / "gate.md").exists() and not (workspace.root / "mlflow.db").exists()
    assert f"the parent {s2.id[:12]} is not the champion (the base model)" in (res.report_dir / "gate.md").read_text()
    store.approve(new.id, by="erin")
    check = store.promotion_check(new.id)
    assert check.gate_event == res.event_seq
    assert res.passed and check.ok, check.unmet
    store.promote(new.id, by="erin")
    assert store.champion() == new.id
