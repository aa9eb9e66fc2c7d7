"""zsRE in the lifelong benchmark: token-level metrics against a direct computation, the record to
request conversion, memory growth per edit, and a full tiny run (no /work/shared)."""

import json

import pytest
import torch

from kedit.bench.datasets import get_dataset, zsre_request, zsre_template
from kedit.bench.footprint import edit_footprint, tensor_bytes
from kedit.bench.lifelong import LifelongConfig, results_markdown, run_lifelong, write_results
from kedit.editors.base import EditorState
from kedit.evaluation import metrics as M

ZSRE = [
    {"subject": "The Eiffel Tower", "src": "Where is The Eiffel Tower located?", "pred": "Paris",
     "rephrase": "In which city is The Eiffel Tower?", "alt": "Rome", "answers": ["Paris"],
     "loc": "nq question: capital of italy", "loc_ans": "Rome"},
    {"subject": "Toko Yasuda", "src": "What instrument does Toko Yasuda play?", "pred": "guitar",
     "rephrase": "Which instrument is played by Toko Yasuda?", "alt": "piano", "answers": ["guitar"],
     "loc": "nq question: who plays for inter miami", "loc_ans": "Lionel Messi"},
    {"subject": "danielle darrieux", "src": "What is the mother tongue of Danielle Darrieux?", "pred": "French",
     "rephrase": "Which language does Danielle Darrieux speak?", "alt": "Dutch", "answers": ["French"],
     "loc": "nq question: capital of germany", "loc_ans": "Berlin"},
]


def _direct_predictions(lm, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """One unpadded forward pass of prompt + " " + target; the argmax at each target position."""
    p = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    t = lm.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p + t])).logits[0]
    return logits[len(p) - 1: len(p) - 1 + len(t)].argmax(-1).tolist(), t


def test_token_accuracy_is_the_share_of_matching_positions():
    assert M.token_accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    assert M.token_accuracy([7], [7]) == 1.0
    with pytest.raises(ValueError, match="equal non-empty"):
        M.token_accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="equal non-empty"):
        M.token_accuracy([], [])


def test_zsre_metrics_match_a_direct_computation(tiny_lm):
    before = [_direct_predictions(tiny_lm, r["loc"], r["loc_ans"])[0] for r in ZSRE]
    assert M.zsre_locality_predictions(tiny_lm, ZSRE) == before
    res = M.evaluate_zsre(tiny_lm, ZSRE, loc_before=before)
    assert res["locality"] == 1.0
    for key, field in (("reliability", "src"), ("generalization", "rephrase")):
        per = []
        for r in ZSRE:
            pred, tgt = _direct_predictions(tiny_lm, r[field], r["alt"])
            per.append(sum(a == b for a, b in zip(pred, tgt)) / len(tgt))
        assert res[f"{key}_per_record"] == pytest.approx(per)
        assert res[key] == pytest.approx(sum(per) / len(per))
    # perturb the model: locality is the share of loc_ans positions whose argmax moved from `before`
    torch.manual_seed(0)
    with torch.no_grad():
        for name, w in tiny_lm.model.named_parameters():
            if name.endswith("mlp.down_proj.weight"):
                w.add_(torch.randn_like(w) * 50)
    res2 = M.evaluate_zsre(tiny_lm, ZSRE, loc_before=before)
    per = []
    for r, b in zip(ZSRE, before):
        after = _direct_predictions(tiny_lm, r["loc"], r["loc_ans"])[0]
        per.append(sum(x == y for x, y in zip(after, b)) / len(b))
    assert res2["locality_per_record"] == pytest.approx(per)
    assert res2["locality"] < 1.0  # large noise in the MLPs moves the argmax
    assert res2["failed_ids"] == [i for i, a in enumerate(res2["reliability_per_record"]) if a < 1]


def test_zsre_records_are_checked():
    bad = [dict(ZSRE[0])]
    del bad[0]["rephrase"]
    with pytest.raises(ValueError, match=r"records\[0\]: missing zsRE fields \['rephrase'\]"):
        M.check_zsre(bad)
    with pytest.raises(ValueError, match="'alt' must be a non-empty string"):
        M.check_zsre([{**ZSRE[0], "alt": " "}])


def test_zsre_question_becomes_a_request_with_the_subject_templated():
    assert zsre_template("Where is X located?", "X") == ("Where is {} located?", "X", False)
    # only case-insensitively present: the question's own spelling is the subject, and it is counted
    assert zsre_template("What is the mother tongue of Danielle Darrieux?", "danielle darrieux") == (
        "What is the mother tongue of {}?", "Danielle Darrieux", True)
    with pytest.raises(ValueError, match="does not contain the subject 'Nobody'"):
        zsre_template("Where is X located?", "Nobody", "zsre.json record 4")
    req = zsre_request(ZSRE[0], "7")
    assert (req.prompt, req.subject, req.target_new, req.target_true, req.id) == (
        "Where is {} located?", "The Eiffel Tower", "Rome", "Paris", "7")
    assert req.paraphrases == [ZSRE[0]["rephrase"]] and req.neighbors == [ZSRE[0]["loc"]]
    assert get_dataset("zsre").subject_fallbacks(ZSRE) == 1
    with pytest.raises(ValueError, match="unknown benchmark data set 'squad'"):
        get_dataset("squad")


def test_added_bytes_per_edit_of_a_fake_state():
    deltas = {"w1": torch.zeros(4, 8), "w2": torch.zeros(3, dtype=torch.float16)}
    first = EditorState("fake", {"patch_keys": torch.zeros(10, 16)})  # after a first batch of 10 edits
    final = EditorState("fake", {"patch_keys": torch.zeros(30, 16), "masks": torch.zeros(30, 5, dtype=torch.bool)})
    assert tensor_bytes(deltas) == 4 * 8 * 4 + 3 * 2
    fp = edit_footprint(deltas, final, 30, tensor_bytes(first.tensors), 10)
    assert fp["delta_bytes"] == 134 and fp["state_bytes"] == 30 * 16 * 4 + 30 * 5
    assert fp["added_bytes"] == 134 + 2070 and fp["added_bytes_per_edit"] == pytest.approx(2204 / 30)
    assert fp["state_growth_bytes_per_edit"] == pytest.approx((2070 - 640) / 20)
    assert edit_footprint({}, None, 5)["added_bytes"] == 0 and edit_footprint({}, None, 5)[
        "state_growth_bytes_per_edit"] is None
    with pytest.raises(ValueError, match="n_edits must be positive"):
        edit_footprint(deltas, final, 0)


def test_lifelong_zsre_run_reports_token_metrics_and_memory_growth(tiny_lm, workspace, tmp_path, monkeypatch,
                                                                   tiny_text):
    import kedit.stats.corpus as corpus

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    data, text = tmp_path / "zsre.json", tmp_path / "corpus.txt"
    data.write_text(json.dumps(ZSRE))
    text.write_text("\n".join(tiny_text * 10))
    cfg = LifelongConfig(method="alphaedit", dataset="zsre", data=str(data), edits=3, batch=2, fluency_prompts=2,
                         fluency_tokens=8, ppl_tokens=200, stats_corpus=str(text), stats_tokens=2000,
                         overrides={"layers": [1, 2], "n_prefixes": 1, "prefix_len": 3, "v_steps": 3})
    unedited = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    res = run_lifelong(tiny_lm, workspace, cfg, progress=False)
    b, e = res["baseline"], res["edited"]
    for block in (b, e):
        assert {"reliability", "generalization", "locality", "fluency", "perplexity", "nkl",
                "canary_agreement"} <= set(block) and "efficacy" not in block
    assert b["locality"] == 1.0 and b["canary_agreement"] == 1.0
    assert [p["edits"] for p in res["curve"]] == [2, 3] and set(res["curve"][0]) >= {"reliability", "locality"}
    assert res["config"]["subject_fallbacks"] == 1
    # the edited numbers are evaluate_zsre on the edited model against the unedited model's loc answers
    edited_weights = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    tiny_lm.model.load_state_dict(unedited)
    before = M.zsre_locality_predictions(tiny_lm, ZSRE)
    assert b["reliability"] == M.evaluate_zsre(tiny_lm, ZSRE)["reliability"]
    tiny_lm.model.load_state_dict(edited_weights)
    direct = M.evaluate_zsre(tiny_lm, ZSRE, loc_before=before)
    assert {k: e[k] for k in ("reliability", "generalization", "locality")} == {
        k: direct[k] for k in ("reliability", "generalization", "locality")}
    # memory growth: AlphaEdit's summed deltas (two down-projections) and its fixed-size state
    down = [v for k, v in unedited.items() if k.endswith("layers.1.mlp.down_proj.weight")][0]
    assert e["delta_bytes"] == 2 * down.numel() * down.element_size()
    assert e["state_bytes"] > 0 and e["added_bytes"] == e["delta_bytes"] + e["state_bytes"]
    assert e["added_bytes_per_edit"] == pytest.approx(e["added_bytes"] / 3)
    assert e["state_growth_bytes_per_edit"] == 0  # ΣKKᵀ does not grow with the edits
    out = write_results(res, tmp_path / "out")
    md = (out / "results.md").read_text()
    assert "3 zsRE records from `zsre.json`" in md
    assert "| reliability | generalization | locality |" in md and "added bytes/edit" in md
    assert "memory growth: summed weight deltas" in md and "case-insensitively in 1 questions" in md
    assert "| edits | records scored | reliability | generalization | locality | perplexity |" in md
    assert json.loads((out / "results.json").read_text())["edited"]["added_bytes"] == e["added_bytes"]
    assert (out / "curve.png").stat().st_size > 1000


def test_invalid_records_are_left_out_with_their_reason_and_ids_keep_the_file_index(tmp_path):
    """``load_valid`` (``bench lifelong --skip-invalid``): a record without a new answer is left out with
    its reason, the next valid record takes its place, and request ids are the records' file indices;
    without the option the same file is refused, naming the record."""
    ds = get_dataset("zsre")
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([ZSRE[0], {**ZSRE[1], "alt": ""}, ZSRE[2]]))
    recs, index, skipped = ds.load_valid(data, 2)
    assert recs == [ZSRE[0], ZSRE[2]] and index == [0, 2]
    assert [k["record"] for k in skipped] == [1] and "alt" in skipped[0]["reason"]
    assert [r.id for r in ds.requests(recs, str(data), 0, index)] == ["0", "2"]
    assert ds.load_valid(data, 1, offset=1)[1] == [2]
    with pytest.raises(ValueError, match="only 2 available"):
        ds.load_valid(data, 3)
    with pytest.raises(ValueError, match=r"\[1\].*alt"):
        ds.load(data, 3)
    res = _fake_results()
    res["config"]["skipped_records"] = skipped
    assert "Left out as invalid: record 1 (" in results_markdown(res)
    assert "Left out" not in results_markdown(_fake_results())


def _fake_results() -> dict:
    m = {"efficacy": 0.9, "generalization": 0.8, "specificity": 0.7, "efficacy_magnitude": 0.25, "score": 0.79,
         "fluency": 600.0, "greedy_entropy": 500.0, "perplexity": 20.0, "nkl": 0.01, "canary_agreement": 0.95,
         "fluency_setup": {"prompts": 2, "new_tokens": 8, "top_k": 5, "seed": 0}}
    edited = {**m, "seconds_per_edit": 1.5, "edit_seconds": 15.0, "one_time_seconds": 3.0, "peak_memory_mb": 900.0,
              "device": "cpu", **edit_footprint({"w": torch.zeros(2, 2)}, None, 10)}
    res = {"config": {"method": "alphaedit", "model": "m", "edits": 10, "batch": 5, "data": "cf.json", "offset": 0,
                      "layers": [1], "load_average": None, "eval_seconds": 1.0, "ppl_tokens": 100,
                      "stats": {"n_tokens": 10}},
           "baseline": m, "edited": edited, "curve": [], "diagnostics": []}
    return res


def test_counterfact_report_shows_every_metrics_md_metric():
    """ES, PS, NS, EM, S, fluency, perplexity, NKL, canary agreement, s/edit, one-time s, peak memory."""
    md = results_markdown(_fake_results())
    assert "| EM | S |" in md and "| 0.250 | 0.790 |" in md
    assert "| canary agreement |" in md and "| 0.950 |" in md and "| 2 |" in md  # 16 bytes / 10 edits
    assert "one-time work" in md and "peak memory 900 MB" in md and "1.50 s/edit" in md


def test_default_data_is_the_first_shared_folder_that_has_the_file(tmp_path, monkeypatch):
    import kedit.bench.datasets as D

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "zsre-dev-1k.json").write_text("[]")
    monkeypatch.setattr(D, "SHARED_DATA_DIRS", (tmp_path / "a", tmp_path / "b"))
    assert get_dataset("zsre").default_data() == tmp_path / "b" / "zsre-dev-1k.json"
    assert get_dataset("counterfact").default_data() == tmp_path / "a" / "counterfact-dev.json"


def test_cli_dataset_choice_picks_its_default_file(monkeypatch, tmp_path, capsys):
    import kedit.bench.datasets as D
    import kedit.bench.lifelong as L
    import kedit.cli.edit as E
    from kedit.cli import main

    (tmp_path / "zsre-dev-1k.json").write_text("[]")
    monkeypatch.setattr(D, "SHARED_DATA_DIRS", (tmp_path,))
    seen = {}

    def fake_run(lm, ws, cfg, **kw):  # stop before any model work: only the configuration is checked
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(E, "load_lm", lambda args: None)
    monkeypatch.setattr(L, "run_lifelong", fake_run)
    with pytest.raises(SystemExit):
        main(["bench", "lifelong", "--dataset", "zsre"])
    assert seen["cfg"].dataset == "zsre" and seen["cfg"].data == str(tmp_path / "zsre-dev-1k.json")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "lifelong", "--dataset", "squad"])
    assert exc.value.code == 2
    assert "invalid choice: 'squad'" in capsys.readouterr().err
