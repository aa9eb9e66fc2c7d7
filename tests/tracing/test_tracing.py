"""Causal tracing on a tiny random model: exact recovery, shapes, batched == unbatched, layer writes."""

from __future__ import annotations

import json

import pytest
import torch

from kedit import tracing as TR
from kedit.hooks import Trace

PROMPT, SUBJECT = "{} is located in", "The Eiffel Tower"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tiny_lm):
    s, text, target = TR.make_setup(tiny_lm, PROMPT, SUBJECT, samples=3, noise=3.0, seed=1)
    return s


def test_subject_range_and_prompt_fill(tiny_lm):
    text, pos = TR.fill_prompt(PROMPT, SUBJECT)
    assert text.startswith(SUBJECT) and pos == 0
    s0, s1 = TR.subject_token_range(tiny_lm.tokenizer, text, SUBJECT, pos)
    ids = tiny_lm.tokenizer(text)["input_ids"]
    assert tiny_lm.tokenizer.decode(ids[s0:s1]).strip() == SUBJECT
    t2 = "Yesterday, The Eiffel Tower is located in"
    s0, s1 = TR.subject_token_range(tiny_lm.tokenizer, t2, SUBJECT)
    assert s0 > 0 and tiny_lm.tokenizer.decode(tiny_lm.tokenizer(t2)["input_ids"][s0:s1]).strip() == SUBJECT
    with pytest.raises(ValueError, match="does not occur"):
        TR.fill_prompt("Paris is nice", "Rome")


def test_window_and_best_block():
    assert TR.window_layers(0, 30, 10) == list(range(0, 5))
    assert TR.window_layers(15, 30, 10) == list(range(10, 20))
    assert TR.window_layers(29, 30, 10) == list(range(24, 30))
    assert TR.window_layers(3, 30, 1) == [3]
    assert TR.best_block([0, 1, 5, 4, 0, 3], 2) == [2, 3]
    assert TR.best_block([0, 1, 5, 4, 0, 3], 10) == list(range(6))


def test_restoring_every_state_recovers_clean(tiny_lm, setup):
    T = len(setup.ids)
    names = TR.module_names(tiny_lm, "hidden")
    clean, clean_p = TR.clean_run(tiny_lm, setup.ids, names)
    everything = [(n, t) for n in names for t in range(T)]
    probs = TR.restored_probs(tiny_lm, setup, clean, [[], everything, [(names[0], t) for t in range(T)]])
    p_clean = float(clean_p[setup.target_id])
    assert probs[1].item() == pytest.approx(p_clean, abs=1e-5)
    assert probs[2].item() == pytest.approx(p_clean, abs=1e-5)
    assert abs(probs[0].item() - p_clean) > 1e-4  # the noise does corrupt


def _reference(lm, setup, kind, layer, token, window):
    """One forward pass per noise sample, restoring with a plain per-pass hook: the slow definition."""
    L = lm.adapter.num_layers
    names = TR.module_names(lm, kind)
    w = 1 if kind == "hidden" else window
    patch = [names[j] for j in TR.window_layers(layer, L, w)]
    clean, _ = TR.clean_run(lm, setup.ids, names)
    embed = lm.adapter.spec.embed
    s0, s1 = setup.subject
    ps = []
    for s in range(setup.noise.shape[0]):
        def edit(name, x, s=s):
            x = x.clone()
            if name == embed:
                x[0, s0:s1] += setup.noise[s]
            else:
                x[0, token] = clean[name][token]
            return x
        with torch.no_grad(), Trace(lm.model, [embed, *patch], edit_output=edit):
            logits = lm.model(setup.ids[None]).logits[0, -1]
        ps.append(torch.softmax(logits, -1)[setup.target_id].item())
    return sum(ps) / len(ps)


def test_batched_trace_equals_reference(tiny_lm):
    res = TR.trace_fact(tiny_lm, PROMPT, SUBJECT, samples=3, window=3, seed=1, batch_rows=7)
    setup, _, _ = TR.make_setup(tiny_lm, PROMPT, SUBJECT, samples=3, seed=1)
    L, T = tiny_lm.adapter.num_layers, len(res.tokens)
    for kind in TR.KINDS:
        assert len(res.effects[kind]) == T and all(len(row) == L for row in res.effects[kind])
    for kind, layer, token in [("hidden", 1, 2), ("mlp", 0, res.subject_range[1] - 1), ("attn", 3, T - 1),
                               ("mlp", 2, T - 1)]:
        ref = _reference(tiny_lm, setup, kind, layer, token, 3)
        assert res.restored[kind][token][layer] == pytest.approx(ref, abs=1e-5)
        assert res.effects[kind][token][layer] == pytest.approx(ref - res.corrupted_prob, abs=1e-5)
    # a different packing of rows into batches gives the same numbers
    res2 = TR.trace_fact(tiny_lm, PROMPT, SUBJECT, samples=3, window=3, seed=1, batch_rows=1000)
    torch.testing.assert_close(torch.tensor(res2.effects["mlp"]), torch.tensor(res.effects["mlp"]), atol=1e-5, rtol=0)


def test_pre_subject_tokens_have_zero_effect(tiny_lm):
    res = TR.trace_fact(tiny_lm, "Yesterday, {} is in", SUBJECT, kinds=("hidden",), samples=2, window=1)
    s0 = res.subject_range[0]
    assert s0 > 0
    setup, _, _ = TR.make_setup(tiny_lm, "Yesterday, {} is in", SUBJECT, samples=2)
    assert _reference(tiny_lm, setup, "hidden", 1, 0, 1) == pytest.approx(res.corrupted_prob, abs=1e-6)
    assert all(v == 0.0 for row in res.effects["hidden"][:s0] for v in row)


def test_trace_save_json_and_png(tiny_lm, tmp_path):
    res = TR.trace_fact(tiny_lm, PROMPT, SUBJECT, target="Paris", samples=2, window=2)
    res.save(tmp_path)
    data = json.loads((tmp_path / "trace.json").read_text())
    assert set(data["effects"]) == {"hidden", "mlp", "attn"}
    assert data["subject_range"] == res.subject_range and data["target"] == "Paris"
    assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"


def _known_records(lm):
    """Facts the tiny model 'knows': the ground truth is its own greedy next token."""
    from kedit.evaluation.metrics import next_token_logprobs

    prompts = [("The Eiffel Tower is located in", "The Eiffel Tower"), ("Rome is the capital of", "Rome"),
               ("Messi plays for", "Messi"), ("The quick brown fox jumps", "The quick brown fox"),
               ("Danielle Darrieux speaks", "Danielle Darrieux"), ("Toko Yasuda plays the", "Toko Yasuda")]
    am = next_token_logprobs(lm, [p for p, _ in prompts]).argmax(-1).tolist()
    recs = [{"case_id": i, "prompt": p, "subject": s, "ground_truth": lm.tokenizer.decode([a]).strip() or "x"}
            for i, ((p, s), a) in enumerate(zip(prompts, am))]
    recs.append({"case_id": 99, "prompt": "Rome is the capital of", "subject": "Rome", "ground_truth": "zzzq"})
    return recs


def test_aggregate_and_known_facts(tiny_lm, tmp_path):
    recs = _known_records(tiny_lm)
    known = TR.known_facts(tiny_lm, recs, n=100)
    assert 99 not in [r["case_id"] for r in known] and len(known) >= 1
    res = TR.aggregate(tiny_lm, recs, n=3, kinds=("mlp", "attn"), samples=2, window=2, block_size=2,
                       progress=False)
    assert res.n == min(3, len(known)) and len(res.mean["mlp"]) == tiny_lm.adapter.num_layers
    assert res.recommended_layers == TR.best_block(res.mean["mlp"], 2)
    # mean of per-fact effects equals the aggregate
    effs = [TR.trace_last_subject(tiny_lm, r, ("mlp",), 2, 3.0, 2, 0, 512)[0]["mlp"] for r in known[: res.n]]
    torch.testing.assert_close(torch.stack(effs).mean(0), torch.tensor(res.mean["mlp"]), atol=1e-6, rtol=0)
    res.save(tmp_path)
    assert (tmp_path / "aggregate.png").exists() and "recommended" in (tmp_path / "aggregate.md").read_text()


def test_write_layers_is_targeted(tmp_path):
    import yaml

    p = tmp_path / "m.yaml"
    original = ("# comment kept\ndefaults:\n  layers: [4, 5, 6]\n  v_lr: 0.5\n  why:\n    layers: \"x\"\n"
                "rome:\n  layers: [6]\n")
    p.write_text(original)
    TR.write_layers(p, [2, 3], note="trace aggregate n=5")
    data = yaml.safe_load(p.read_text())
    assert data["defaults"]["layers"] == [2, 3] and data["rome"]["layers"] == [6]
    assert data["defaults"]["why"]["layers"] == "x" and p.read_text().startswith("# comment kept\n")
    assert p.read_text().replace("[2, 3]  # trace aggregate n=5", "[4, 5, 6]") == original
    with pytest.raises(FileNotFoundError, match="no hyperparameter file"):
        TR.write_layers(tmp_path / "missing.yaml", [1])
