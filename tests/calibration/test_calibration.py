"""`kedit calibrate`: the pure threshold/separation math against direct computation, the held-out split,
a deterministic calibration of a tiny random model whose file loads back, and the uncalibrated refusal."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from kedit.calibration import thresholds as T
from kedit.calibration.split import check_heldout, dev_split, file_split, split_counts

SUBJECTS = [("The Eiffel Tower", "is located in", "Rome", "Paris", "Rome is the capital of"),
            ("Toko Yasuda", "plays the", "piano", "guitar", "Lionel Messi plays"),
            ("Danielle Darrieux", "speaks", "Dutch", "French", "Berlin is the capital of"),
            ("Thomas Joannes Stieltjes", "was born in", "London", "Bordeaux", "Madrid is the capital of"),
            ("Lionel Messi", "plays for", "Tokyo", "Inter Miami", "Apple A5 was created by"),
            ("Apple A5", "was created by", "Microsoft", "Apple", "The quick brown fox jumps over the")]


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        s, rel, new, true, loc = SUBJECTS[i % len(SUBJECTS)]
        out.append({"case_id": i, "prompt": f"{s} {rel}", "subject": s, "target_new": new, "ground_truth": true,
                    "rephrase_prompt": f"In short, {s} {rel}", "locality_prompt": loc,
                    "locality_ground_truth": "Italy"})
    return out


# --- pure functions against direct computation ---------------------------------------------------------
def _direct_lowest(neg: list[float], rate: float, k: int, floor: float = 0.0) -> float:
    for i in range(1, k + 1):
        t = i / k
        if t >= floor - 1e-12 and sum(v >= t - 1e-9 for v in neg) / max(len(neg), 1) <= rate + 1e-12:
            return t
    return 1.0 + 1.0 / k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_match_direct_computation(seed):
    g = torch.Generator().manual_seed(seed)
    k = 16
    neg = (torch.randint(0, k + 1, (300,), generator=g).double() / k) ** 2
    pos = 1 - (torch.randint(0, k + 1, (80,), generator=g).double() / k) ** 2
    for rate in (0.0, 0.01, 0.1, 0.5):
        assert T.lowest_threshold_for_rate(neg, rate, k) == pytest.approx(_direct_lowest(neg.tolist(), rate, k))
        assert T.lowest_threshold_for_rate(neg, rate, k, floor=0.5) == \
            pytest.approx(_direct_lowest(neg.tolist(), rate, k, 0.5))
    for keep in (0.5, 0.9, 0.95, 1.0):
        direct = max([i / k for i in range(k + 1) if sum(v >= i / k - 1e-9 for v in pos.tolist()) / 80 >= keep]
                     or [0.0])
        assert T.highest_threshold_keeping(pos, keep, k) == pytest.approx(direct)
    sep = T.separation(pos, neg, 0.05, k)
    assert sep.threshold == pytest.approx(_direct_lowest(neg.tolist(), 0.05, k))
    assert sep.recall == pytest.approx(sum(v >= sep.threshold - 1e-9 for v in pos.tolist()) / 80)
    assert sep.neg_rate <= 0.05 + 1e-12
    assert sep.margin == pytest.approx(float(pos.median()) - float(neg.max()))
    assert T.share_at_or_above(torch.tensor([0.25, 0.5, 0.75]), 0.5) == pytest.approx(2 / 3)
    assert T.lowest_threshold_for_rate(torch.ones(5), 0.0, 4) == 1.25  # nothing may fire: above the grid


def test_read_share_schedule_holds_the_budget_and_stops_at_the_floor():
    from kedit.editors.memoir import scheduled_share

    rate, budget, floor, p = 1e-6, 0.0025, 0.7, 3.0
    sched = T.read_share_schedule(rate, budget, floor, p)
    n0 = 2500
    assert sched[0] == [n0, 1.0] and sched[-1][1] == floor
    assert [a for a, _ in sched] == sorted({a for a, _ in sched})
    for n, s in sched[1:-1]:  # each point: reads x share**p at the budget's, i.e. share = (n0/n)**(1/p)
        assert s == pytest.approx((n0 / n) ** (1 / p), abs=1e-4)
        assert n * rate * s ** p == pytest.approx(budget, rel=1e-3)
    assert scheduled_share(sched, 100) == 1.0 and scheduled_share(sched, 10**6) == floor
    assert T.read_share_schedule(0.0, budget, floor) == [[0, 1.0]]
    with pytest.raises(ValueError, match="floor"):
        T.read_share_schedule(rate, budget, 0.0)


def test_set_overlaps_match_python_sets():
    from kedit.calibration.fingerprints import best_overlap, own_overlap, set_overlaps

    g = torch.Generator().manual_seed(0)
    d, k = 40, 6
    a = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(30)])
    b = torch.stack([torch.randperm(d, generator=g)[:k] for _ in range(7)])
    direct = torch.tensor([[len(set(x.tolist()) & set(y.tolist())) / k for y in b] for x in a])
    assert torch.allclose(set_overlaps(a, b, d, chunk=8), direct.float())
    best, arg = best_overlap(a, b, d, chunk=8)
    assert torch.allclose(best, direct.max(1).values.float()) and torch.equal(arg, direct.float().max(1).indices)
    owner = torch.randint(0, 7, (30,), generator=g)
    assert torch.allclose(own_overlap(a, b, owner, chunk=4), direct[torch.arange(30), owner].double())


# --- the held-out split ----------------------------------------------------------------------------------
def test_split_is_disjoint_deterministic_and_checked(tmp_path):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records(50)))
    assert split_counts(10_000) == (9000, 10_000) and split_counts(50) == (45, 50) and split_counts(3) == (2, 3)
    s = dev_split(data, 50)
    assert s == dev_split(data, 50)  # deterministic
    cal, held = set(range(s.cal_start, s.cal_end)), set(range(0, s.heldout_end))
    assert cal and held and not cal & held and cal | held == set(range(50))
    assert s.calibration_indices(3) == [45, 46, 47] and s.calibration_indices(99) == list(range(45, 50))
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump({"calibration": {"split": s.to_dict()}, "defaults": {}}))
    assert file_split(hp) == s
    ok = check_heldout(hp, data, 0, 45)
    assert ok.overlap == [] and ok.same_data and "Held out" in ok.sentence()
    with pytest.raises(ValueError, match=r"include calibration records \[45, 47\).*--allow-calibration-records"):
        check_heldout(hp, data, 40, 7)
    loud = check_heldout(hp, data, 40, 7, allow_overlap=True)
    assert loud.overlap == [45, 47] and "WARNING" in loud.sentence()
    assert check_heldout(tmp_path / "none.yaml", data, 40, 7).split is None  # a hand-set file: nothing to check
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_records(60)))
    assert check_heldout(hp, other, 40, 7).overlap == []  # another file: its records are not the calibration's


# --- calibration of a tiny random model ------------------------------------------------------------------
@pytest.fixture
def tiny_store(tmp_path, tiny_tokenizer, tiny_model_factory, tiny_text):
    """A tiny random Llama imported into a workspace's model store, a CounterFact-like file, a corpus."""
    from kedit.models.store import import_hf
    from kedit.workspace import Workspace

    src = tmp_path / "tiny-src"
    tiny_model_factory("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    ws = Workspace(tmp_path / "ws")
    import_hf(ws, src, slug="tiny-llama")
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records(120)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(tiny_text * 40))
    return ws, data, corpus


def _config(data, corpus):
    from kedit.calibration.run import CalibrationConfig

    return CalibrationConfig(data=str(data), records=12, layers=[1, 2], k_candidates=(4, 8), probe_requests=3,
                             probe_lrs=(0.5, 2.0), probe_cap=6, general_tokens=300, general_docs=40, bg_docs=10,
                             corpus=str(corpus), n_prefixes=2, prefix_len=3)


def test_uncalibrated_store_model_is_refused_with_the_command(tiny_store, tmp_path, capsys):
    """memoir's spec row refuses a store model whose settings file has no memoir block, before any
    statistics, baseline or edit; a file with one, or settings built in code, pass."""
    from kedit.bench.lifelong import LifelongConfig, run_lifelong
    from kedit.editors.hparams import MemoirHparams, load_hparams
    from kedit.editors.memoir import UncalibratedModel
    from kedit.editors.setup import prepare_edit
    from kedit.models.store import load_model

    ws, data, _ = tiny_store
    lm = load_model("tiny-llama", ws)
    hp = load_hparams("memoir", lm)  # loading alone does not refuse: default.yaml's defaults
    assert hp.source.endswith("default.yaml")
    with pytest.raises(UncalibratedModel, match=r"kedit calibrate --model tiny-llama"):
        prepare_edit(lm, "memoir", ws)
    bare = tmp_path / "bare.yaml"  # an explicit file without a memoir block is no calibration either
    bare.write_text(yaml.safe_dump({"defaults": {"layers": [1]}}))
    with pytest.raises(UncalibratedModel, match=r"bare.yaml has no memoir block"):
        prepare_edit(lm, "memoir", ws, hparams_file=bare)
    with pytest.raises(UncalibratedModel):  # the benchmark refuses before it scores the baseline
        run_lifelong(lm, ws, LifelongConfig(method="memoir", data=str(data), edits=2, batch=2), progress=False)
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"defaults": {"layers": [1]}, "memoir": {"mm_k": 8, "mm_bg_docs": 4}}))
    assert prepare_edit(lm, "memoir", ws, hparams_file=own).hp.mm_k == 8
    assert prepare_edit(lm, "memoir", ws, hp=MemoirHparams(layers=[1], mm_bg_docs=4)).hp.mm_layer == -1
    assert load_hparams("memit", lm).source.endswith("default.yaml")  # the weight editors still fall back
    from kedit.cli import main

    assert main(["-w", str(ws.root), "edit", "--model", "tiny-llama", "--method", "memoir", "--requests",
                 str(tiny_store[1]), "--out", str(ws.root / "e")]) == 2
    err = capsys.readouterr().err
    assert "no memoir settings" in err and "kedit calibrate --model tiny-llama" in err
    assert not (ws.root / "e").exists()  # nothing half-written


def test_refresh_key_follows_the_store_models_calibrated_file(tiny_store):
    """The nightly's content key hashes the settings the edit will use: the workspace model's own file
    once `kedit calibrate` wrote one."""
    from kedit.config import RefreshConfig
    from kedit.editors.hparams import load_hparams
    from kedit.refresh import refresh_key

    ws, _, _ = tiny_store
    cfg = RefreshConfig(model="tiny-llama", method="memoir")
    before = refresh_key("f" * 64, None, cfg, ws)
    assert before == refresh_key("f" * 64, None, cfg)  # no file of its own: the package's lookup
    own = ws.model_dir("tiny-llama") / "hparams.yaml"
    own.write_text(yaml.safe_dump({"defaults": {"layers": [1]}, "memoir": {"mm_k": 8}}))
    after = refresh_key("f" * 64, None, cfg, ws)
    assert after != before and load_hparams("memoir", path=own).mm_k == 8


def test_calibration_is_deterministic_and_its_file_loads_back(tiny_store, tmp_path, one_thread):
    from kedit.calibration.hparams_file import write_hparams
    from kedit.calibration.report import write_report
    from kedit.calibration.run import calibrate
    from kedit.editors.hparams import METHODS, hparams_file_for, load_hparams
    from kedit.models.store import load_model

    ws, data, corpus = tiny_store
    lm = load_model("tiny-llama", ws)
    cfg = _config(data, corpus)
    a = calibrate(lm, cfg, ws.cache_dir)
    b = calibrate(lm, cfg, ws.cache_dir)
    assert a.hparams() == b.hparams()
    # the measured values pass through memoir's settings class: one the memory cannot read is refused
    with pytest.raises(ValueError, match="mm_read_scale_by_entries"):
        dataclasses.replace(a, schedule=[[10, 1.0], [5, 0.7]]).hparams()
    assert [r.summary() for r in a.settings] == [r.summary() for r in b.settings]
    assert a.records["fingerprints"] == [108, 120]  # the last 10% of 120 records, first 12 of them
    assert a.split.cal_start == 108 and a.split.heldout_end == 108
    out = ws.model_dir("tiny-llama") / "hparams.yaml"
    write_hparams(out, a, hparams_file_for(None), "kedit calibrate --model tiny-llama")
    write_report(a, tmp_path / "rep", out, "kedit calibrate --model tiny-llama")
    assert (tmp_path / "rep" / "overlaps.png").stat().st_size > 1000
    md = (tmp_path / "rep" / "calibration.md").read_text()
    assert "fingerprint" in md and "Floor" in md and "window NLL rise" in md
    # the read-share rule's inputs were measured on a memory written for real
    rd = a.read
    assert rd is not None and rd.damage.entries == 12 and len(rd.damage.damage) == len(cfg.damage_shares)
    assert rd.floor in cfg.floor_shares and a.fire_rate > rd.fire_rate_point
    assert a.hparams()["memoir"]["mm_exact_read_scale"] is None
    # the store model now finds its own file, for every method, with the calibrated values
    lm2 = load_model("tiny-llama", ws)
    hp = load_hparams("memoir", lm2)
    assert hp.source == str(out)
    h = a.hparams()["memoir"]
    assert (hp.mm_layer, hp.mm_k, hp.mm_threshold, hp.mm_exact_threshold, hp.mm_span_threshold) == \
        (h["mm_layer"], h["mm_k"], h["mm_threshold"], h["mm_exact_threshold"], h["mm_span_threshold"])
    assert hp.layers == a.layers and hp.v_lr == a.v_lr and hp.v_steps == a.v_steps
    assert hp.mm_layer in a.layers and hp.mm_k in (4, 8)
    assert "mm_threshold" in hp.notes and "v_lr" in hp.notes and "layers" in hp.notes
    assert load_hparams("memit", lm2).v_lr == 0.5  # v* was probed for the memory: the weight editors keep theirs
    for m in METHODS:
        load_hparams(m, lm2)
    doc = yaml.safe_load(out.read_text())
    rs = doc["calibration"]["read_shares"]  # small rates keep their digits
    assert rs["fire_rate_used"] == pytest.approx(a.fire_rate, rel=1e-3) and rs["fire_rate_used"] > 0
    assert doc["calibration"]["split"]["calibration_records"] == [108, 120]
    assert file_split(out).cal_start == 108


def test_bench_refuses_calibration_records_and_reports_the_split(tiny_store, tmp_path, monkeypatch,
                                                                 tiny_text):
    """A calibrated file's split reaches the benchmark: records inside it are refused unless allowed
    (and then reported as not held out); a held-out run says which records each side used."""
    import kedit.stats.corpus as corpus_mod
    from kedit.bench.lifelong import LifelongConfig, results_markdown, run_lifelong
    from kedit.calibration.split import dev_split

    ws, data, _ = tiny_store
    monkeypatch.setattr(corpus_mod, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    s = dev_split(data, 120)
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump({"calibration": {"split": s.to_dict()},
                                  "defaults": {"layers": [1], "n_prefixes": 1, "prefix_len": 3, "v_steps": 2},
                                  "memoir": {"mm_k": 8, "mm_bg_docs": 4}}))
    from kedit.models.store import load_model

    lm = load_model("tiny-llama", ws)
    base = dict(method="memoir", data=str(data), batch=2, fluency_prompts=1, fluency_tokens=4, ppl_tokens=100,
                hparams_file=str(hp))
    with pytest.raises(ValueError, match=r"calibration records \[108, 110\)"):
        run_lifelong(lm, ws, LifelongConfig(edits=2, offset=108, **base), progress=False)
    res = run_lifelong(lm, ws, LifelongConfig(edits=2, offset=0, **base), progress=False)
    assert res["config"]["heldout"]["overlap"] == [] and res["config"]["heldout"]["records"] == [0, 2]
    assert "Held out: records [0, 2)" in results_markdown(res) and "[108, 120)" in results_markdown(res)
    res = run_lifelong(lm, ws, LifelongConfig(edits=2, offset=108, allow_calibration_records=True, **base),
                       progress=False)
    assert res["config"]["heldout"]["overlap"] == [108, 110] and "WARNING" in results_markdown(res)


def test_background_means_equal_the_memorys_own(tiny_lm, tiny_text):
    """One pass for several layers gives exactly what the memory computes per layer."""
    from kedit.calibration.fingerprints import background_means
    from kedit.editors.memoir import background_mean

    got = background_means(tiny_lm, [1, 2], tiny_text)
    for layer in (1, 2):
        assert torch.equal(got[layer], background_mean(tiny_lm, layer, tiny_text))


def test_kedit_calibrate_writes_the_store_models_file_and_report(tiny_store, capsys, one_thread):
    """The command end to end on a store model: the file lands beside the model, loads for memoir, and
    the report (markdown + PNG) is written; bad arguments are clear errors that write nothing."""
    from kedit.cli import main
    from kedit.editors.hparams import load_hparams
    from kedit.models.store import load_model

    ws, data, _ = tiny_store
    args = ["-w", str(ws.root), "calibrate", "--model", "tiny-llama", "--data", str(data), "--layers", "1-2",
            "--k", "8", "--records", "6", "--probe-requests", "2", "--general-tokens", "400", "--threads", "1"]
    assert main([*args[:-2], "--k", "eight"]) == 2
    assert "--k: expected" in capsys.readouterr().err
    assert not (ws.model_dir("tiny-llama") / "hparams.yaml").exists()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "memory at layer" in out
    hp = load_hparams("memoir", load_model("tiny-llama", ws))
    assert hp.source == str(ws.model_dir("tiny-llama") / "hparams.yaml") and hp.mm_k == 8
    rep = ws.reports_dir / "calibration" / "tiny-llama"
    assert (rep / "calibration.md").is_file() and (rep / "overlaps.png").is_file()
    assert "kedit calibrate" in yaml.safe_load(open(hp.source))["calibration"]["command"]


def test_edit_block_leaves_out_the_first_and_last_layer():
    from kedit.calibration.run import edit_block

    curve = [0.9, 0.1, 0.3, 0.4, 0.2, 0.0, 0.8]
    direct = max((sum(curve[i: i + 3]), -i) for i in range(1, len(curve) - 3))
    assert edit_block(curve, 3) == list(range(-direct[1], -direct[1] + 3)) == [2, 3, 4]
    assert edit_block([0.1, 0.5], 1) == [1] and edit_block([0.5, 0.1, 0.2, 0.9], 5) == [1, 2]


def test_choose_lr_and_repeat_share():
    from kedit.calibration.run import repeat_share
    from kedit.calibration.vstar_probe import ProbeRun, choose_lr

    runs = [ProbeRun(0.5, [12, 14, 9], [True, True, True], 1.0), ProbeRun(1.0, [6, 8, 5], [True, True, True], 1.0),
            ProbeRun(2.0, [3, 39, 4], [True, False, True], 1.0)]
    assert choose_lr(runs) == (1.0, 14)  # fewest mean steps among >= 90% converged; slowest 8 (+1) x 1.5
    assert choose_lr(runs, min_converged=0.6) == (1.0, 14)  # 2.0's mean (15.3) is higher
    assert choose_lr([ProbeRun(0.5, [39], [False], 1.0)], cap=40) == (0.5, 40)
    assert choose_lr([ProbeRun(4.0, [1, 1], [True, True], 1.0)]) == (4.0, 10)  # at least 10
    assert repeat_share(["Paris", "London", " Paris", "French", "London"]) == pytest.approx(2 / 5)
