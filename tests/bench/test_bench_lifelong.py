"""The lifelong benchmark end to end on a tiny model and a tiny CounterFact file (no /work/shared)."""

import json

import pytest

from kedit.bench.lifelong import LifelongConfig, load_counterfact, run_lifelong, write_results


@pytest.fixture
def cf_file(tmp_path, counterfact_records):
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(counterfact_records))
    return p


@pytest.fixture
def corpus_file(tmp_path, tiny_text):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(tiny_text * 10))
    return p


def test_lifelong_bench_writes_results(tiny_lm, workspace, cf_file, corpus_file, tmp_path, monkeypatch,
                                       counterfact_records, tiny_text):
    import kedit.stats.corpus as corpus

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    cfg = LifelongConfig(method="alphaedit", data=str(cf_file), edits=3, batch=2, fluency_prompts=2, fluency_tokens=8,
                         ppl_tokens=200, stats_corpus=str(corpus_file), stats_tokens=2000,
                         overrides={"layers": [1, 2], "n_prefixes": 1, "prefix_len": 3, "v_steps": 3})
    import torch

    from kedit.editors.base import apply_deltas
    from kedit.editors.io import load_deltas, load_state

    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    res = run_lifelong(tiny_lm, workspace, cfg, progress=False, edit_out=tmp_path / "edit")
    # the saved edit is the sum of every batch: unedited weights + it = the benchmark's edited model
    after = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    tiny_lm.model.load_state_dict(before)
    # fluency is METRICS.md's sampled GE and greedy_entropy its greedy twin, on the same edit prompts
    from kedit.evaluation import metrics as M

    prompts = [r["prompt"] for r in counterfact_records[:2]]
    assert res["baseline"]["fluency"] == M.generation_entropy(tiny_lm, prompts, max_new_tokens=8)
    assert res["baseline"]["greedy_entropy"] == M.greedy_entropy(tiny_lm, prompts, max_new_tokens=8)
    assert res["baseline"]["fluency_setup"] == {"prompts": 2, "new_tokens": 8, "top_k": 5, "seed": 0}
    # free generation: the 8-token greedy scores of the records' three prompts, before and after
    from kedit.evaluation.freegen import FREEGEN_KEYS, evaluate_free_generation

    def free_gen() -> dict:
        return evaluate_free_generation(tiny_lm, *([r[f] for r in counterfact_records[:3]] for f in
                                                   ("prompt", "rephrase_prompt", "locality_prompt",
                                                    "target_new")))

    assert {k: res["baseline"][k] for k in FREEGEN_KEYS} == free_gen()
    deltas = load_deltas(tmp_path / "edit")
    assert sorted(deltas) == sorted(k for k in before if not torch.equal(before[k], after[k]))
    apply_deltas(tiny_lm.model, deltas)
    for k, v in tiny_lm.model.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=1e-6)
    assert {k: res["edited"][k] for k in FREEGEN_KEYS} == free_gen()
    state = load_state(tmp_path / "edit")
    assert state.meta["n_edits"] == 3 and state.meta["n_batches"] == 2 and "cache_c.L1" in state.tensors
    for block in ("baseline", "edited"):
        for key in ("efficacy", "generalization", "specificity", "fluency", "greedy_entropy", "perplexity", "nkl",
                    "seconds_per_edit", "one_time_seconds", "peak_memory_mb", "device"):
            assert key in res[block]
    assert 0 <= res["edited"]["efficacy"] <= 1 and res["edited"]["seconds_per_edit"] > 0
    assert res["edited"]["nkl"] >= 0 and res["baseline"]["nkl"] == 0
    assert [p["edits"] for p in res["curve"]] == [2, 3]
    assert res["curve"][0]["perplexity"] > 0 and res["curve"][-1]["perplexity"] == res["edited"]["perplexity"]
    # the last point is the final evaluation itself (every record, scored once)
    assert all(res["curve"][-1][m] == res["edited"][m] for m in ("efficacy", "generalization", "specificity"))
    assert len(res["diagnostics"]) == 3 and set(res["config"]["nullspace_dim"]) == {1, 2}
    out = write_results(res, tmp_path / "out")
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {"config", "baseline", "edited"}
    assert "| unedited |" in (out / "results.md").read_text()
    md = (out / "results.md").read_text()
    assert "95% intervals over the" in md
    assert "| greedy entropy (x100) |" in md and "8 new tokens after each of the first 2 edit prompts" in md
    assert "top-k sampling with k=5 from seed 0" in md
    assert "| ES gen | ES gen ∋ | PS gen | PS gen ∋ | NS gen | NS gen ∌ |" in md and "free generation" in md
    assert (out / "curve.png").stat().st_size > 1000


def test_load_counterfact_checks_its_input(cf_file, tmp_path):
    assert len(load_counterfact(cf_file, 2, offset=1)) == 2
    with pytest.raises(ValueError, match="only 3 available"):
        load_counterfact(cf_file, 5)
    with pytest.raises(FileNotFoundError):
        load_counterfact(tmp_path / "missing.json", 1)


def test_solver_sweep_reuses_vstar_and_restores_the_model(tiny_lm, workspace, cf_file, corpus_file, tmp_path,
                                                          monkeypatch, tiny_text):
    import torch

    import kedit.editors.vstar as vstar_mod
    import kedit.stats.corpus as corpus
    from kedit.bench.solvers import SweepConfig, grid, run_sweep, write_sweep

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    calls = []
    real = vstar_mod.optimise_vstar
    monkeypatch.setattr(vstar_mod, "optimise_vstar", lambda *a, **k: calls.append(1) or real(*a, **k))
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    settings = grid({"nullspace_mom2_weight": [0.0, 50.0], "L2": [0.1]}) + [{"v_steps": 2}]
    assert settings[:2] == [{"nullspace_mom2_weight": 0.0, "L2": 0.1}, {"nullspace_mom2_weight": 50.0, "L2": 0.1}]
    cfg = SweepConfig(method="alphaedit", data=str(cf_file), edits=3, ppl_tokens=200, stats_corpus=str(corpus_file),
                      stats_tokens=2000, base={"layers": [1, 2], "n_prefixes": 1, "prefix_len": 3, "v_steps": 3},
                      settings=settings)
    res = run_sweep(tiny_lm, workspace, cfg, progress=False)
    # the two solver settings share one v*; changing a v* knob optimises again
    assert len(calls) == 2 and [r["vstar_reused"] for r in res["rows"]] == [False, True, False]
    a, b = res["rows"][0], res["rows"][1]
    assert set(a["output_change_share"]) == {1, 2} and all(v > 0 for v in a["output_change_share"].values())
    # the soft λ·C term shrinks the update's output on general-text keys
    assert sum(b["output_change_share"].values()) < sum(a["output_change_share"].values())
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every setting was taken off again
    out = write_sweep(res, tmp_path / "sweep")
    assert "| 2 | nullspace_mom2_weight=50, L2=0.1 |" in (out / "results.md").read_text()
    assert (out / "frontier.png").stat().st_size > 1000


def test_solver_sweep_reports_the_norm_anchor(tiny_lm, workspace, cf_file, corpus_file, monkeypatch,
                                              tiny_text):
    import kedit.stats.corpus as corpus
    from kedit.bench.solvers import SweepConfig, run_sweep
    from kedit.editors.norm_anchor import clear_memo

    clear_memo()
    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    cfg = SweepConfig(method="alphaedit", data=str(cf_file), edits=3, ppl_tokens=200, stats_corpus=str(corpus_file),
                      stats_tokens=2000, base={"layers": [1, 2], "n_prefixes": 1, "prefix_len": 3, "v_steps": 3},
                      settings=[{}, {"v_norm_anchor": True}])
    res = run_sweep(tiny_lm, workspace, cfg, progress=False)
    plain, anchored = res["rows"]
    assert "norm_anchor" not in plain and anchored["vstar_reused"]  # the anchor does not change v*
    assert anchored["norm_anchor"]["anchor_norm"] > 0 and anchored["norm_anchor"]["n_skipped"] == 0
    # the anchor was cached beside the statistics
    assert list(workspace.stats_dir.rglob("vstar_anchor/L2_*.json"))
    clear_memo()


def test_solver_sweep_refuses_an_editor_without_key_statistics(cf_file):
    """The sweep's output-change share reads the method's key statistics; its spec says memoir reads none."""
    from kedit.bench.solvers import SweepConfig, run_sweep

    with pytest.raises(ValueError, match="'memoir' reads none"):
        run_sweep(None, None, SweepConfig(method="memoir", data=str(cf_file), edits=3), progress=False)


def test_sweep_settings_from_the_command_line():
    from kedit.cli import CLIError
    from kedit.cli.bench import _sweep_settings

    assert _sweep_settings(None, None) == [{}]
    got = _sweep_settings(["L2=[1, 5]", "layers=[[4, 5], [6]]"], ["{nullspace_threshold: 1.0e+9}"])
    assert got == [{"L2": 1, "layers": [4, 5]}, {"L2": 1, "layers": [6]}, {"L2": 5, "layers": [4, 5]},
                   {"L2": 5, "layers": [6]}, {"nullspace_threshold": 1e9}]
    with pytest.raises(CLIError, match="--grid expects"):
        _sweep_settings(["L2=5"], None)
    with pytest.raises(CLIError, match="--setting expects"):
        _sweep_settings(None, ["[1, 2]"])


def test_lifelong_resumed_after_a_kill_equals_a_straight_run(tiny_tokenizer, workspace, cf_file, corpus_file,
                                                             tmp_path, monkeypatch, one_thread,
                                                             tiny_model_factory, tiny_text):
    """Killed after batch 2 of 3 (checkpoints every batch), resumed in a fresh model: the same curve,
    metrics, diagnostics, summed deltas and editor state as an uninterrupted run, bit for bit. On one
    thread: with two, the solve's multi-threaded float64 reductions can differ in the last bit between two
    straight runs in one process (seen in AlphaEdit's update norm, 2026-12-07)."""
    import dataclasses

    import torch

    import kedit.stats.corpus as corpus
    from kedit.editors.io import load_deltas, load_state
    from kedit.models.store import wrap_model

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    cfg = LifelongConfig(method="alphaedit", data=str(cf_file), edits=3, batch=1, eval_every=1, fluency_prompts=2,
                         fluency_tokens=8, ppl_tokens=200, stats_corpus=str(corpus_file), stats_tokens=2000,
                         overrides={"layers": [1, 2], "n_prefixes": 1, "prefix_len": 3, "v_steps": 3})

    def fresh():  # what a new process loads
        return wrap_model(tiny_model_factory("llama"), tiny_tokenizer, slug="tiny-llama")

    straight = run_lifelong(fresh(), workspace, cfg, progress=False, edit_out=tmp_path / "straight")
    ck = tmp_path / "run" / "checkpoint.safetensors"

    class Killed(Exception):
        pass

    def kill(rep):
        if rep.index == 1:
            raise Killed

    with pytest.raises(Killed):
        run_lifelong(fresh(), workspace, cfg, progress=False, checkpoint=ck, checkpoint_every=1, on_batch=kill)
    with pytest.raises(ValueError, match="batch differ"):
        run_lifelong(fresh(), workspace, dataclasses.replace(cfg, batch=2), progress=False, checkpoint=ck,
                     resume=True)
    resumed = run_lifelong(fresh(), workspace, cfg, progress=False, edit_out=tmp_path / "resumed", checkpoint=ck,
                           resume=True)
    assert resumed["config"]["checkpoint"]["resumed_after_batches"] == 2
    assert resumed["curve"] == straight["curve"] and len(resumed["curve"]) == 3
    assert resumed["diagnostics"] == straight["diagnostics"] and resumed["layer_info"] == straight["layer_info"]
    timing = ("seconds_per_edit", "edit_seconds", "one_time_seconds", "peak_memory_mb")
    for block in ("baseline", "edited"):
        assert {k: v for k, v in resumed[block].items() if k not in timing} == \
            {k: v for k, v in straight[block].items() if k not in timing}
    a, b = load_deltas(tmp_path / "straight"), load_deltas(tmp_path / "resumed")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_state(tmp_path / "straight"), load_state(tmp_path / "resumed")
    assert sorted(sa.tensors) == sorted(sb.tensors) and all(torch.equal(sa.tensors[k], sb.tensors[k]) for k in sa.tensors)
    assert sa.meta == sb.meta
    # a finished run's checkpoint (written after the last batch) resumes straight to the evaluation
    again = run_lifelong(fresh(), workspace, cfg, progress=False, checkpoint=ck, resume=True)
    assert again["config"]["checkpoint"]["resumed_after_batches"] == 3 and again["curve"] == straight["curve"]


def test_checkpoint_flags_need_an_output_directory(capsys):
    from kedit.cli import main

    assert main(["bench", "lifelong", "--checkpoint-every", "5"]) == 2
    assert "need --out" in capsys.readouterr().err
    assert main(["bench", "lifelong", "--resume"]) == 2
    assert "need --out" in capsys.readouterr().err


def test_lifelong_bench_reports_an_editor_that_adds_parameters(tiny_lm, workspace, cf_file, tmp_path,
                                                               monkeypatch, tiny_text):
    """T-Patcher reads no key statistics: the run, its report and its memory growth still come out."""
    import kedit.stats.corpus as corpus

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    cfg = LifelongConfig(method="tpatcher", data=str(cf_file), edits=3, batch=2, fluency_prompts=2, fluency_tokens=8,
                         ppl_tokens=200, overrides={"layers": [2], "n_prefixes": 1, "prefix_len": 3, "tp_steps": 3,
                                                    "tp_memory_corpus": ""})
    res = run_lifelong(tiny_lm, workspace, cfg, progress=False)
    assert res["config"]["stats"] is None
    assert res["edited"]["state_bytes"] > 0 and res["edited"]["delta_bytes"] == 0
    md = (write_results(res, tmp_path / "out") / "results.md").read_text()
    assert "no key statistics" in md and "| tpatcher T3 B2 |" in md


def test_curve_sample_is_evenly_spaced_and_keeps_the_ends():
    from kedit.bench.lifelong import curve_sample

    assert curve_sample(5, 0) == [0, 1, 2, 3, 4] and curve_sample(5, 8) == [0, 1, 2, 3, 4]
    assert curve_sample(10_000, 1000)[:3] == [0, 10, 20] and curve_sample(10_000, 1000)[-1] == 9999
    assert len(curve_sample(10_000, 1000)) == 1000 and curve_sample(7, 1) == [6]
    assert curve_sample(7, 3) == [0, 3, 6]


def test_curve_records_samples_points_and_the_baseline_is_checkpointed(tiny_tokenizer, workspace, cf_file,
                                                                       corpus_file, tmp_path, monkeypatch,
                                                                       tiny_model_factory, tiny_text):
    """A kill inside the first batch resumes from the checkpoint written after the baseline (no second
    baseline evaluation) and ends as a straight run does; curve points before the last score the sample."""
    import kedit.bench.lifelong as L
    import kedit.stats.corpus as corpus
    from kedit.models.store import wrap_model

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    cfg = LifelongConfig(method="memoir", data=str(cf_file), edits=3, batch=1, eval_every=1, curve_records=1,
                         fluency_prompts=2, fluency_tokens=8, ppl_tokens=200,
                         overrides={"layers": [1], "n_prefixes": 1, "prefix_len": 3, "v_steps": 3, "mm_bg_docs": 4})

    def fresh():
        return wrap_model(tiny_model_factory("llama"), tiny_tokenizer, slug="tiny-llama")

    straight = run_lifelong(fresh(), workspace, cfg, progress=False)
    assert [p["records"] for p in straight["curve"]] == [1, 1, 3]  # the last point scores every record
    ck = tmp_path / "run" / "checkpoint.safetensors"

    class Killed(Exception):
        pass

    import kedit.editors.session as S

    real_step = S.EditSession.step

    def killed_step(self, *a, **k):
        raise Killed

    monkeypatch.setattr(S.EditSession, "step", killed_step)
    with pytest.raises(Killed):
        run_lifelong(fresh(), workspace, cfg, progress=False, checkpoint=ck, checkpoint_every=1)
    assert S.SessionCheckpoint.load(ck).batches_done == 0
    monkeypatch.setattr(S.EditSession, "step", real_step)
    calls = []
    for name in ("_baseline_metrics", "_final_metrics"):
        real = getattr(L, name)
        monkeypatch.setattr(L, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    resumed = run_lifelong(fresh(), workspace, cfg, progress=False, checkpoint=ck, resume=True)
    assert calls == ["_final_metrics"]  # only the final evaluation ran; the baseline was read back
    assert resumed["config"]["checkpoint"]["resumed_after_batches"] == 0
    assert resumed["curve"] == straight["curve"] and resumed["diagnostics"] == straight["diagnostics"]
    timing = ("seconds_per_edit", "edit_seconds", "one_time_seconds", "peak_memory_mb")
    for block in ("baseline", "edited"):
        assert {k: v for k, v in resumed[block].items() if k not in timing} == \
            {k: v for k, v in straight[block].items() if k not in timing}


def test_a_kill_inside_the_final_evaluation_resumes_with_the_pieces_already_scored(tiny_tokenizer, workspace,
                                                                                   cf_file, tmp_path,
                                                                                   monkeypatch,
                                                                                   counterfact_records,
                                                                                   tiny_model_factory,
                                                                                   tiny_text):
    """The final evaluation runs in pieces of EVAL_CHUNK records, each saved beside the checkpoint: a
    kill in the second piece resumes at it (the first is read back, not scored again) and ends with the
    results of a straight run; the pieces joined equal one evaluation of every record."""
    import kedit.bench.lifelong as L
    import kedit.evaluation.metrics as M
    import kedit.stats.corpus as corpus
    from kedit.bench.datasets import get_dataset
    from kedit.models.store import wrap_model

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    monkeypatch.setattr(L, "EVAL_CHUNK", 2)
    cfg = LifelongConfig(method="memoir", data=str(cf_file), edits=3, batch=3, eval_every=5, fluency_prompts=2,
                         fluency_tokens=8, ppl_tokens=200,
                         overrides={"layers": [1], "n_prefixes": 1, "prefix_len": 3, "v_steps": 3, "mm_bg_docs": 4})

    def fresh():
        return wrap_model(tiny_model_factory("llama"), tiny_tokenizer, slug="tiny-llama")

    straight = run_lifelong(fresh(), workspace, cfg, progress=False)
    ck = tmp_path / "run" / "checkpoint.safetensors"
    scored, real_eval = [], M.evaluate_counterfact

    class Killed(Exception):
        pass

    def evaluate(lm, records, *a, kill_at=None, **k):
        scored.append([r["case_id"] for r in records])
        if len(scored) == kill_at:
            raise Killed
        return real_eval(lm, records, *a, **k)

    # calls: the baseline (3 records), then the final pieces [1, 2] and [3]; the kill is in the second piece
    monkeypatch.setattr(M, "evaluate_counterfact", lambda *a, **k: evaluate(*a, kill_at=3, **k))
    with pytest.raises(Killed):  # the baseline scored again (not read from the cache), so the calls count it
        run_lifelong(fresh(), workspace, cfg, progress=False, checkpoint=ck, checkpoint_every=1, baseline_cache=False)
    assert scored == [[1, 2, 3], [1, 2], [3]] and (ck.parent / "checkpoint.eval.json").exists()
    scored.clear()
    monkeypatch.setattr(M, "evaluate_counterfact", lambda *a, **k: evaluate(*a, **k))
    resumed = run_lifelong(fresh(), workspace, cfg, progress=False, checkpoint=ck, resume=True)
    assert scored == [[3]]  # the first piece was read back
    timing = ("seconds_per_edit", "edit_seconds", "one_time_seconds", "peak_memory_mb")
    assert {k: v for k, v in resumed["edited"].items() if k not in timing} == \
        {k: v for k, v in straight["edited"].items() if k not in timing}
    assert resumed["curve"] == straight["curve"]
    # a new run in the same place starts its evaluation afresh: the saved pieces are dropped
    scored.clear()
    run_lifelong(fresh(), workspace, cfg, progress=False, checkpoint=ck, checkpoint_every=5,
                 on_batch=lambda rep: None)
    assert scored == [[1, 2], [3]]  # (the unedited row now comes from the cache)

    ds, lm = get_dataset("counterfact"), fresh()
    whole = ds.evaluate(lm, counterfact_records, None, [1, 2, 3])
    joined = ds.merge([ds.evaluate(lm, counterfact_records[:1], None, [1]), ds.evaluate(lm,
                                                                                        counterfact_records[1:], None, [2, 3])])
    assert {k: v for k, v in joined.items() if k not in ("magnitude", "efficacy_magnitude", "score")} == \
        {k: v for k, v in whole.items() if k not in ("magnitude", "efficacy_magnitude", "score")}
    assert joined["magnitude"] == pytest.approx(whole["magnitude"], abs=1e-6)
    assert joined["score"] == pytest.approx(whole["score"], abs=1e-12)


def test_a_second_run_on_the_same_records_reads_the_unedited_row_from_the_cache(tiny_tokenizer, workspace, cf_file,
                                                                                 monkeypatch, tiny_model_factory,
                                                                                 tiny_text):
    """The unedited model's metrics are scored once per model, records, measurements and scoring code;
    a run that differs in any of them (or asks for a fresh baseline, or finds the file unreadable)
    scores them again, and every run's unedited row is the same."""
    import dataclasses

    import kedit.bench.baseline_cache as C
    import kedit.bench.lifelong as L
    import kedit.stats.corpus as corpus
    from kedit.models.store import wrap_model

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    cfg = LifelongConfig(method="memoir", data=str(cf_file), edits=2, batch=2, fluency_prompts=2, fluency_tokens=8,
                         ppl_tokens=200, freegen_tokens=3,
                         overrides={"layers": [1], "n_prefixes": 1, "prefix_len": 3, "v_steps": 2, "mm_bg_docs": 4})
    calls = []
    real = L._baseline_metrics
    monkeypatch.setattr(L, "_baseline_metrics", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(c=cfg, **kw):
        lm = wrap_model(tiny_model_factory("llama"), tiny_tokenizer, slug="tiny-llama")
        n = len(calls)
        res = run_lifelong(lm, workspace, c, progress=False, **kw)
        return res, len(calls) > n

    first, scored = run()
    assert scored and first["config"]["baseline_source"]["cached"] is False
    files = list((workspace.cache_dir / C.CACHE_SUBDIR).glob("*.json"))
    assert [f.stem for f in files] == [first["config"]["baseline_source"]["key"]]
    timing = ("seconds_per_edit", "one_time_seconds", "peak_memory_mb", "device")

    def row(res):
        return {k: v for k, v in res["baseline"].items() if k not in timing}

    second, scored = run()
    assert not scored and second["config"]["baseline_source"]["cached"] is True
    assert row(second) == row(first)
    assert "read from the workspace cache" in L.results_markdown(second)
    # another setting of the editor does not change the unedited model's row: still cached
    _, scored = run(dataclasses.replace(cfg, overrides={**cfg.overrides, "v_steps": 3}))
    assert not scored
    # other measurements, a fresh baseline asked for, an unreadable file: scored again
    _, scored = run(dataclasses.replace(cfg, fluency_prompts=1))
    assert scored
    _, scored = run(baseline_cache=False)
    assert scored
    files[0].write_text("{not json")
    again, scored = run()
    assert scored and row(again) == row(first)
    # a change to the scoring code is a change of key
    monkeypatch.setattr(C, "scoring_code_hash", lambda *a, **k: "changed")
    _, scored = run()
    assert scored
