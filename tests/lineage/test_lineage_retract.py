"""Retracting one fact (kedit.lineage.retract, `kedit retract`): exactly one fact leaves an added-capacity
state, as a new child state restored on a fresh model; weight editors refuse and offer an edit back;
`kedit lineage diff` names the fact that owns each added row."""

from __future__ import annotations

import json

import pytest
import torch

from kedit.lineage import LineageError, LineageStore

pytestmark = pytest.mark.usefixtures("one_thread")


def _last_logits(lm, text: str) -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(input_ids=ids).logits[0]


def _outputs(lm, prompts: dict[str, str]) -> dict[str, torch.Tensor]:
    return {f: _last_logits(lm, p) for f, p in prompts.items()}


def test_tpatcher_retract_through_the_cli_removes_exactly_one_fact(workspace, stored_lm, tmp_path, capsys,
                                                                   commit_batches, tpatcher):
    from kedit.cli import main
    from kedit.editors import tpatcher as T
    from kedit.editors.registry import get_editor

    lm = stored_lm()
    prompts = {r.id: r.prompt.format(r.subject) for r in tpatcher.reqs}
    base = _outputs(lm, prompts)
    editor = get_editor("tpatcher", tpatcher.hp(), cache_dir=tmp_path)
    store = LineageStore(workspace.lineage_dir)
    s1, s2 = commit_batches(store, lm, lambda lm, reqs, es: editor.compute(lm, reqs, es, None),
                          [tpatcher.reqs[:2], tpatcher.reqs[2:]])
    edited = _outputs(lm, prompts)
    assert not torch.equal(edited["eiffel"], base["eiffel"])
    w = ["-w", str(workspace.root)]
    assert main([*w, "retract", "eiffel", "--by", "carol", "--reason", "source withdrawn", "--state",
                 s2.id[:10]]) == 0
    out = capsys.readouterr().out
    new = LineageStore(workspace.lineage_dir).get("HEAD")
    assert new.short in out and "candidate" in out
    assert new.parent == s2.id and new.method == "tpatcher" and new.deltas == {}
    assert new.feed["kind"] == "retraction" and new.feed["retracted"] == ["eiffel"]
    assert new.feed["from_state"] == s2.id and new.feed["by"] == "carol" and new.feed["reason"] == "source withdrawn"
    assert set(store.facts(new.id)) == {"darrieux", "yasuda"}  # the later batch's fact stays
    # retention gates and the feed's already-applied check no longer see the retracted fact
    from kedit.feeds.champion import applied_facts

    assert [f["id"] for f in store.fact_records(new.id)] == ["darrieux", "yasuda"]
    assert [f["id"] for f in store.fact_records(s2.id)] == ["eiffel", "darrieux", "yasuda"]
    assert ("The Eiffel Tower", "{} is located in", "capital") not in applied_facts(store, new.id)
    assert ("The Eiffel Tower", "{} is located in", "capital") in applied_facts(store, s2.id)
    # restored on a fresh model: the retracted prompt is the base model's, the others are as they were
    fresh = stored_lm()
    es = store.materialise(new.id, fresh)
    assert es.meta["patch_facts"] == ["darrieux", "yasuda"]
    after = _outputs(fresh, prompts)
    assert torch.equal(after["eiffel"], base["eiffel"])
    for f in ("darrieux", "yasuda"):
        assert torch.equal(after[f], edited[f]), f
    parent_es = store.editor_state(s2.id)
    assert torch.equal(es.tensors[T.VALUE], parent_es.tensors[T.VALUE][[1, 2]])
    assert main([*w, "lineage", "log"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "retraction of eiffel by carol:" in out and "withdrawn" in out
    # the diff names the fact that owns each patch row, added and removed
    assert main([*w, "lineage", "diff", s2.id[:10], new.id[:10]]) == 0
    out = capsys.readouterr().out
    assert "facts removed (1): eiffel" in out and "- fact eiffel: rows 0 in" in out and "3 rows -> tpatcher 2" in out
    assert main([*w, "lineage", "diff", "base", s2.id[:10], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows["added"] == {"eiffel": [0], "darrieux": [1], "yasuda": [2]} and rows["removed"] == {}
    # not applied on that state's path (retracted already, or never there): an error naming the state
    assert main([*w, "retract", "eiffel", "--by", "carol", "--reason", "again", "--state", new.id]) == 2
    err = capsys.readouterr().err
    assert "not applied on the path to state " + new.id[:12] in err
    assert main([*w, "retract", "yasuda", "--by", "carol", "--reason", "x", "--state", s1.id]) == 2
    assert s1.id[:12] in capsys.readouterr().err
    # a candidate like any other: no promotion without a gate and an approval
    with pytest.raises(LineageError, match="gate"):
        store.promote(new.id, by="carol")


def test_memoir_retract_removes_exactly_one_fact_through_the_lineage(tiny_lm, tiny_tokenizer, tmp_path,
                                                                     commit_batches, tiny_model_factory,
                                                                     memoir):
    """The retracted fact's prompt is the base model's; a fact whose mask shares no column with it keeps
    its output bit for bit. A fact sharing columns keeps its own entry bit for bit, but W' on the shared
    columns loses the retracted block (the memory superposes blocks there), so its output may move."""
    from kedit.editors.base import EditRequest
    from kedit.editors.memoir import BLOCK_U, BLOCK_V, MASKS, W, residual_matrix
    from kedit.lineage.retract import owner_diff, retract, row_owners
    from kedit.models.store import wrap_model

    d = dict(prompt="The capital city of {}", subject="Germany", target_new="Tokyo", target_true="Berlin", id="d")
    lm = tiny_lm
    reqs = [EditRequest(**memoir.a), EditRequest(**memoir.b), EditRequest(**d)]
    prompts = {r.id: r.prompt.format(r.subject) for r in reqs}
    base = _outputs(lm, prompts)
    store = LineageStore(tmp_path / "lineage")
    s1, s2 = commit_batches(store, lm, lambda lm, rq, es: memoir.editor().compute(lm, rq, es, None),
                          [reqs[:1], reqs[1:]])
    edited = _outputs(lm, prompts)
    assert not torch.equal(edited["a"], base["a"])
    old = store.editor_state(s2.id)
    masks = [set(m.tolist()) for m in old.tensors[MASKS]]
    assert not masks[0] & masks[2] and masks[0] & masks[1]  # d is disjoint from a, b shares a column
    new = retract(store, lm, s2.id, "a", by="dana", reason="wrong source")
    assert retract(store, lm, s2.id, "a", by="dana", reason="wrong source").id == new.id  # content-addressed
    assert new.parent == s2.id and store.facts(new.id) == {"b": "feed1", "d": "feed1"}
    fresh = wrap_model(tiny_model_factory("llama"), tiny_tokenizer, slug="tiny-llama")
    es = store.materialise(new.id, fresh)
    assert es.meta["entry_owner"] == ["b", "d"]
    assert torch.equal(es.tensors[MASKS], old.tensors[MASKS][1:])
    assert torch.equal(es.tensors[BLOCK_U], old.tensors[BLOCK_U][1:])
    assert torch.equal(es.tensors[BLOCK_V], old.tensors[BLOCK_V][1:])
    assert torch.equal(es.tensors[W], residual_matrix(old.tensors[MASKS][1:], old.tensors[BLOCK_U][1:],
                                                      old.tensors[BLOCK_V][1:], lm.adapter.key_dim()))
    after = _outputs(fresh, prompts)
    assert torch.equal(after["a"], base["a"]) and torch.equal(after["d"], edited["d"])
    diff = owner_diff(row_owners(store, s2.id), row_owners(store, new.id))
    assert diff["removed"] == {"a": [0]} and diff["added"] == {} and diff["rows_to"] == 2
    with pytest.raises(LineageError, match="'zz' is not applied on the path to state " + s2.id[:12]):
        retract(store, lm, s2.id, "zz", by="dana", reason="x")


def test_weight_editor_fact_is_refused_with_an_edit_back_request(workspace, stored_lm, capsys, run_batches,
                                                                 fabricate):
    from kedit.cli import main
    from kedit.editors.base import apply_deltas

    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, lm, 1)  # rows r0a, r0b without records
    res = fabricate(lm, store.editor_state(s1.id), 7, ["x1"])
    apply_deltas(lm.model, res.deltas)
    fact = {"id": "x1", "prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome",
            "target_true": "Paris"}
    s2 = store.commit(lm, res, parent=s1.id, hparams={}, feed={"file_sha256": "f7", "row_ids": ["x1"],
                                                                "facts": [fact]})
    n_states = len(store.states())
    w = ["-w", str(workspace.root)]
    out_file = workspace.root / "back.jsonl"
    assert main([*w, "retract", "x1", "--by", "erin", "--reason", "wrong", "--state", s2.id,
                 "--request-out", str(out_file)]) == 2
    err = capsys.readouterr().err
    assert "applied by alphaedit" in err and "cannot be removed exactly" in err
    assert f"kedit edit --method alphaedit --requests {out_file}" in err
    req = json.loads(out_file.read_text())
    assert req["target_new"] == "Paris" and req["target_true"] == "Rome" and req["subject"] == "The Eiffel Tower"
    assert len(LineageStore(workspace.lineage_dir).states()) == n_states  # nothing committed
    # a fact without a record: refused, and no request can be offered
    assert main([*w, "retract", "r0a", "--by", "erin", "--reason", "wrong", "--state", s2.id]) == 2
    err = capsys.readouterr().err
    assert "no target_true" in err and not (workspace.root / "retractions").exists()
