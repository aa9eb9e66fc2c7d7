"""Promotion gates and the canary suite on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kedit.evaluation import metrics as M
from kedit.evaluation.canary import CanarySuite, build_canary, compare, neighbourhood_prompts, shipped_prompts
from kedit.evaluation.gates import Check, GatePolicy, panel_spec, run_gates
from kedit.models.store import wrap_model

PROMPTS = ["The Eiffel Tower is located in", "Rome is the capital of", "Messi plays for", "Danielle speaks",
           "The mother tongue of Thomas is", "Apple A5 was created by"]
pytestmark = pytest.mark.usefixtures("one_thread")


def taken_records(lm, flip: int | None = None) -> list[dict]:
    """Records that the model already satisfies (so they count as taken); ``flip`` makes one fail."""
    a = M.target_logprobs(lm, PROMPTS, ["Paris"] * len(PROMPTS))
    b = M.target_logprobs(lm, PROMPTS, ["Rome"] * len(PROMPTS))
    recs = []
    for i, p in enumerate(PROMPTS):
        new, old = ("Paris", "Rome") if a[i] > b[i] else ("Rome", "Paris")
        if i == flip:
            new, old = old, new
        recs.append({"case_id": f"f{i}", "prompt": p, "subject": p.split()[0], "target_new": new, "ground_truth": old,
                     "rephrase_prompt": p, "locality_prompt": PROMPTS[(i + 1) % len(PROMPTS)],
                     "locality_ground_truth": old})
    return recs


def test_shipped_prompts_and_neighbourhood():
    ps = shipped_prompts()
    assert len(ps) >= 50 and all(p and not p.startswith("#") for p in ps) and len(set(ps)) == len(ps)
    assert neighbourhood_prompts([{"locality_prompt": "A is"}, {"neighbors": ["B is", "A is"]}]) == ["A is", "B is"]


def test_canary_roundtrip_and_self_agreement(sharp_lm, tmp_path, canary_prompts, damaged):
    suite = build_canary(sharp_lm, prompts=canary_prompts, edits=[{"locality_prompt": "Paris is in"}], k=4)
    assert suite.prompts[-1] == "Paris is in" and suite.sources[-1] == "edit-neighbourhood"
    assert suite.greedy.shape == (len(canary_prompts) + 1,
                                  4) and suite.logprobs.shape[0] == len(canary_prompts) + 1
    suite.save(tmp_path)
    back = CanarySuite.load(tmp_path)
    assert torch.equal(back.greedy, suite.greedy) and back.prompts == suite.prompts
    same = compare(back, sharp_lm, k=4)
    assert same.agreement == 1.0 and same.kl == pytest.approx(0.0, abs=1e-6) and not same.changed
    bad = compare(back, damaged(sharp_lm), k=1)
    assert bad.agreement < 1.0 and bad.kl > 0.1 and bad.changed


def test_equal_candidate_passes(sharp_lm, tmp_path, canary_prompts, ref_text, gate_policy):
    recs = taken_records(sharp_lm)
    suite = build_canary(sharp_lm, prompts=canary_prompts)
    twin = wrap_model(copy.deepcopy(sharp_lm.model), sharp_lm.tokenizer, slug="twin")
    rep = run_gates(sharp_lm, twin, GatePolicy(**{**gate_policy, "min_free_generation": 0.0}),
                    new_edits=recs[:3],
                    prior_edits=recs[3:], canary=suite, reference_text=ref_text, progress=False)
    assert rep.passed, [c for c in rep.checks if not c.passed]
    by = {c.name: c for c in rep.checks}
    assert set(by) == {"efficacy", "generalization", "specificity_drop", "free_generation", "retention",
                       "canary_agreement", "neighbourhood_kl", "perplexity_increase_pct", "fluency_drop"}
    assert by["free_generation"].value == by["free_generation"].before  # the twin writes what the champion does
    assert by["efficacy"].value == 1.0 and by["canary_agreement"].value == 1.0
    assert by["neighbourhood_kl"].value == pytest.approx(0.0, abs=1e-6)
    assert by["perplexity_increase_pct"].value == pytest.approx(0.0, abs=1e-6)
    assert by["fluency_drop"].value == pytest.approx(0.0, abs=1e-9)
    assert not any(c.skipped for c in rep.checks)
    rep.save(tmp_path)
    data = json.loads((tmp_path / "gate.json").read_text())
    assert data["passed"] is True
    assert all({"name", "value", "threshold", "passed"} <= set(c) for c in data["checks"])
    assert "PASSED" in (tmp_path / "gate.md").read_text()
    assert (tmp_path / "gate.png").read_bytes()[:4] == b"\x89PNG"


def test_damaging_edit_fails_on_the_right_checks(sharp_lm, tmp_path, canary_prompts, damaged, ref_text,
                                                 gate_policy):
    recs = taken_records(sharp_lm)
    suite = build_canary(sharp_lm, prompts=canary_prompts)
    rep = run_gates(sharp_lm, damaged(sharp_lm), GatePolicy(**gate_policy), new_edits=recs[:3],
                    prior_edits=recs[3:],
                    canary=suite, reference_text=ref_text, progress=False)
    by = {c.name: c for c in rep.checks}
    assert not rep.passed
    for name in ("canary_agreement", "neighbourhood_kl", "perplexity_increase_pct"):
        assert not by[name].passed, (name, by[name])
    assert by["perplexity_increase_pct"].value > 5.0 and by["neighbourhood_kl"].value > 0.05
    rep.save(tmp_path)
    assert json.loads((tmp_path / "gate.json").read_text())["passed"] is False
    assert "FAIL" in (tmp_path / "gate.md").read_text()


def test_facts_that_did_not_take_are_listed(sharp_lm, tmp_path, ref_text, gate_policy, canary_prompts):
    recs = taken_records(sharp_lm, flip=1)
    rep = run_gates(sharp_lm, sharp_lm, GatePolicy(**{**gate_policy, "max_fluency_drop": None}),
                    new_edits=recs[:3],
                    canary=build_canary(sharp_lm,
                                        prompts=canary_prompts), reference_text=ref_text, progress=False)
    assert rep.failed_ids == ["f1"]
    by = {c.name: c for c in rep.checks}
    assert not by["efficacy"].passed and by["efficacy"].value == pytest.approx(2 / 3)
    assert by["retention"].skipped and by["fluency_drop"].skipped
    rep.save(tmp_path)
    md = (tmp_path / "gate.md").read_text()
    assert "did not take" in md and "`f1`" in md


def test_reports_name_the_state_and_plot_changes_against_thresholds(sharp_lm, tmp_path, damaged, ref_text,
                                                                    gate_policy, canary_prompts):
    recs = taken_records(sharp_lm)
    state = {"id": "ab" * 32, "parent": "cd" * 32, "n_edits": 3, "feed": "2026-11-22.jsonl"}
    rep = run_gates(sharp_lm, damaged(sharp_lm), GatePolicy(**{**gate_policy, "max_fluency_drop": None}),
                    new_edits=recs[:3], canary=build_canary(sharp_lm,
                                                            prompts=canary_prompts), reference_text=ref_text,
                    progress=False, candidate_state=state)
    rep.save(tmp_path)
    md = (tmp_path / "gate.md").read_text()
    title = md.splitlines()[0]
    assert title == f"# Promotion gate FAILED: state {'ab' * 6} (parent {'cd' * 6}, 3 edits)"
    assert f"candidate state: `{'ab' * 32}`" in md and "3 from `2026-11-22.jsonl`" in md
    assert md.count("tiny-trained") <= 1  # the model is named once, not as both sides
    assert json.loads((tmp_path / "gate.json").read_text())["candidate_state"] == state

    by = {c.name: c for c in rep.checks}
    kl = panel_spec(by["neighbourhood_kl"])  # an increase: the number itself against its bound
    assert kl["kind"] == "change" and kl["bars"] == [("KL (nats)", by["neighbourhood_kl"].value)]
    assert kl["threshold"] == 0.05
    ppl = panel_spec(by["perplexity_increase_pct"])
    assert ppl["bars"][0][1] == pytest.approx(by["perplexity_increase_pct"].value) and ppl["threshold"] == 5.0
    assert panel_spec(by["efficacy"])["kind"] == "level"
    skipped = panel_spec(by["fluency_drop"])
    assert skipped["kind"] == "skipped" and skipped["caption"].startswith("skipped") and not skipped["bars"]
    assert "skipped" in panel_spec(by["retention"])["caption"]


def test_panel_of_a_drop_is_the_drop():
    c = Check("specificity_drop", 0.2, 0.1, False, "max", before=0.8, after=0.6, bound=0.7)
    spec = panel_spec(c)
    assert spec["bars"] == [("NS drop", 0.2)] and spec["threshold"] == 0.1
    assert spec["caption"] == "champion 0.8 -> candidate 0.6"


def test_header_without_a_state_names_the_model_once(sharp_lm, tmp_path, ref_text, gate_policy,
                                                     canary_prompts):
    twin = wrap_model(copy.deepcopy(sharp_lm.model), sharp_lm.tokenizer, slug="tiny-trained")
    rep = run_gates(sharp_lm, twin, GatePolicy(**{**gate_policy, "max_fluency_drop": None}), new_edits=[],
                    canary=build_canary(sharp_lm,
                                        prompts=canary_prompts), reference_text=ref_text, progress=False)
    from kedit.evaluation.gates import subject_line

    assert subject_line(rep).count("tiny-trained") == 1


def test_policy_validation(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("gates:\n  min_efficacy: 0.8\n  max_neighbourhood_kl: null\n")
    pol = GatePolicy.from_params(p)
    assert pol.min_efficacy == 0.8 and pol.max_neighbourhood_kl is None and pol.min_retention == 0.9
    p.write_text("gates:\n  min_efficasy: 0.8\n")
    with pytest.raises(ValueError, match="min_efficasy"):
        GatePolicy.from_params(p)
    p.write_text("gates:\n  freegen_tokens: 0\n")
    with pytest.raises(ValueError, match=r"gates\.freegen_tokens: .*at least 1 greedy token, got 0"):
        GatePolicy.from_params(p)
    with pytest.raises(FileNotFoundError, match="absent.yaml"):  # an explicit file must exist
        GatePolicy.from_params(tmp_path / "absent.yaml")


def test_free_generation_check_reads_the_greedy_text(tiny_lm, canary_prompts, gate_policy):
    """The gate's free-generation value is the share of new edits whose greedy continuation begins with
    the new object: records whose object is the model's own first word pass, one made to miss fails."""
    from kedit.evaluation.freegen import continuations

    pool = PROMPTS + canary_prompts
    texts = continuations(tiny_lm, pool, 8)
    recs = [{"case_id": f"g{i}", "prompt": p, "subject": p.split()[0], "target_new": t.split()[0],
             "ground_truth": "Paris", "rephrase_prompt": p, "locality_prompt": canary_prompts[0],
             "locality_ground_truth": "Paris"} for i, (p, t) in enumerate(zip(pool, texts)) if t.split()][:3]
    assert len(recs) == 3, texts
    recs.append({**recs[0], "case_id": "miss", "target_new": "Zanzibar"})
    pol = GatePolicy(**{**gate_policy, "max_fluency_drop": None, "max_perplexity_increase_pct": None,
                        "min_free_generation": 0.8})
    suite = build_canary(tiny_lm, prompts=canary_prompts)
    rep = run_gates(tiny_lm, tiny_lm, pol, new_edits=recs, canary=suite, progress=False)
    fg = {c.name: c for c in rep.checks}["free_generation"]
    assert fg.value == pytest.approx(3 / 4) and not fg.passed and "paraphrases" in fg.detail
    rep = run_gates(tiny_lm, tiny_lm, GatePolicy(**{**pol.__dict__, "min_free_generation": 0.75}),
                    new_edits=recs,
                    canary=suite, progress=False)
    assert {c.name: c for c in rep.checks}["free_generation"].passed


def test_champion_scores_given_are_used_and_each_sides_scores_are_reported(sharp_lm, canary_prompts, damaged,
                                                                           ref_text, gate_policy):
    """The champion's perplexity and generation entropy measured earlier on the same settings stand in for
    scoring it again; the report carries both sides' numbers, so the caller can keep the candidate's."""
    pol = GatePolicy(**gate_policy)
    suite = build_canary(sharp_lm, prompts=canary_prompts)
    bad = damaged(sharp_lm)
    full = run_gates(sharp_lm, bad, pol, canary=suite, reference_text=ref_text, progress=False)
    champ = full.scores["champion"]
    assert set(champ) == {"perplexity", "generation_entropy"} and not full.scores["champion_given"]
    by = {c.name: c for c in full.checks}
    assert by["perplexity_increase_pct"].before == champ["perplexity"]
    assert by["perplexity_increase_pct"].after == full.scores["candidate"]["perplexity"]
    assert by["fluency_drop"].after == full.scores["candidate"]["generation_entropy"]

    given = {"perplexity": champ["perplexity"] * 2, "generation_entropy": champ["generation_entropy"] + 1}
    rep = run_gates(sharp_lm, bad, pol, canary=suite, reference_text=ref_text, progress=False,
                    champion_scores=given)
    by2 = {c.name: c for c in rep.checks}
    assert by2["perplexity_increase_pct"].before == given["perplexity"]  # read, not scored again
    assert by2["fluency_drop"].before == given["generation_entropy"]
    assert by2["perplexity_increase_pct"].after == by["perplexity_increase_pct"].after
    assert sorted(rep.scores["champion_given"]) == ["generation_entropy", "perplexity"]
    assert any("measured at its own gate" in n for n in rep.notes)


def test_side_score_cache_keys_on_every_setting_and_writes_atomically(tmp_path):
    from kedit.evaluation.side_scores import SideScoreCache, score_settings

    base = dict(text="a reference text", reference_tokens=4096, fluency_prompts=["A", "B"], fluency_tokens=100,
                seed=0, device="cpu", dtype="torch.float32")
    key = score_settings(**base).key()
    assert key == score_settings(**base).key()
    for name, other in (("text", "another text"), ("reference_tokens", 2048), ("fluency_prompts", ["A"]),
                        ("fluency_tokens", 50), ("seed", 1), ("device", "cuda"), ("dtype", "torch.bfloat16")):
        assert score_settings(**{**base, name: other}).key() != key, name
    cache = SideScoreCache(tmp_path / "scores")
    assert cache.get("s1", key) is None
    cache.put("s1", key, {"perplexity": 12.5, "generation_entropy": None, "other": 3.0})
    assert cache.get("s1", key) == {"perplexity": 12.5}
    cache.put("s1", key, {"generation_entropy": 600.0})
    assert cache.get("s1", key) == {"perplexity": 12.5, "generation_entropy": 600.0}
    assert cache.get("s1", "another-key") is None and cache.get("s2", key) is None
    assert [p.name for p in (tmp_path / "scores").iterdir()] == ["s1.json"]  # no temporary file left
    (tmp_path / "scores" / "s1.json").write_text("{not json")
    assert cache.get("s1", key) is None  # a damaged file is a miss, never an error
    with pytest.raises(ValueError, match="bad model name"):
        cache.put("../x", key, {"perplexity": 1.0})


def test_model_answers_score_each_prompt_once_and_match_direct_calls(sharp_lm, canary_prompts):
    from kedit.evaluation.answers import ModelAnswers

    ans = ModelAnswers(sharp_lm, batch_size=4)
    some, more = canary_prompts[:5], canary_prompts[3:9]
    torch.testing.assert_close(ans.logprobs(some), M.next_token_logprobs(sharp_lm, some), atol=1e-5, rtol=1e-5)
    assert torch.equal(ans.greedy(some, 3), M.greedy_tokens(sharp_lm, some, k=3))
    assert ans.computed == {"greedy": 5, "logprobs": 5}
    got = ans.logprobs(more + more[:1])  # two new prompts scored, the rest (and the repeat) read back
    assert ans.computed["logprobs"] == 5 + len(set(more) - set(some))
    torch.testing.assert_close(got[:-1], M.next_token_logprobs(sharp_lm, more), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[-1], got[0])
    assert torch.equal(ans.greedy(more, 3), M.greedy_tokens(sharp_lm, more, k=3))
    new = len(set(more) - set(some))
    assert ans.computed["greedy"] == 5 + new
    assert ans.greedy(some, 2).shape == (5, 2) and ans.computed["greedy"] == 5 + new + 5  # k=2: its own memo
    with pytest.raises(ValueError, match="no prompts"):
        ans.logprobs([])


def test_retention_records_hold_what_the_full_records_hold_for_efficacy(sharp_lm):
    """gate_records(neighbours=False) asks the champion only for missing old answers (and where the feed's
    old answer is the new object) and gives the same prompt, new and old object as the full records."""
    from kedit.evaluation.candidate import gate_records

    facts = [{"id": "a", "prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome",
              "target_true": "Paris"},
             {"id": "b", "prompt": "{} plays", "subject": "Messi", "target_new": "guitar"},  # no old answer
             {"id": "c", "prompt": "The mother tongue of {} is", "subject": "Thomas", "target_new": "French",
              "target_true": "french"}]  # the feed's old answer is the new one
    full = gate_records(sharp_lm, facts)
    short = gate_records(sharp_lm, facts, neighbours=False)
    keys = ("case_id", "prompt", "subject", "target_new", "ground_truth")
    assert [{k: r[k] for k in keys} for r in full] == short
    assert all("locality_prompt" not in r for r in short)
    M.check_counterfact(short, efficacy_only=True)
    with pytest.raises(ValueError, match="locality_prompt"):
        M.check_counterfact(short)
