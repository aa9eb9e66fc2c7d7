"""Metrics against direct computations on a tiny random model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kedit.evaluation import metrics as M

PROMPTS = ["The Eiffel Tower is located in", "Rome is the capital of", "Messi plays", "The quick brown fox"]


pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["Paris", "Italy and Spain", "soccer", "jumps over"]


def _direct(lm, prompt, target):
    tok = lm.tokenizer
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(torch.tensor([p + t])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[len(p) - 1 + j, t[j]]) for j in range(len(t))), len(t)


@pytest.mark.parametrize("side", ["left", "right"])
def test_target_logprobs_match_direct_and_batching(tiny_lm, side):
    tiny_lm.tokenizer.padding_side = side
    s = M.target_logprobs(tiny_lm, PROMPTS, TARGETS, reduce="sum", batch_size=3)
    mean = M.target_logprobs(tiny_lm, PROMPTS, TARGETS, reduce="mean")
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        total, n = _direct(tiny_lm, p, t)
        assert s[i].item() == pytest.approx(total, abs=1e-4)
        assert mean[i].item() == pytest.approx(total / n, abs=1e-4)
    single = torch.stack([M.target_logprobs(tiny_lm, [p], [t])[0] for p, t in zip(PROMPTS, TARGETS)])
    torch.testing.assert_close(single, mean, atol=1e-5, rtol=0)


def test_single_token_target_is_next_token_logprob(tiny_lm):
    tok = tiny_lm.tokenizer
    # pick a target whose " "+target is exactly one token
    target = next(w for w in ["the", "and", "is", "of"] if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    tid = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    nxt = M.next_token_logprobs(tiny_lm, PROMPTS)
    lp = M.target_logprobs(tiny_lm, PROMPTS, [target] * len(PROMPTS))
    torch.testing.assert_close(lp, nxt[:, tid], atol=1e-5, rtol=0)
    assert torch.allclose(nxt.exp().sum(-1), torch.ones(len(PROMPTS)), atol=1e-4)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward lacks ``logits_to_keep`` (as some remote-code classes do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


def test_scoring_projects_only_target_positions_and_matches_full_logits(tiny_lm):
    """The ``logits_to_keep`` path (only the scored positions reach the unembedding) gives what the full
    logits give, for target scoring, next-token distributions and zsRE's argmax predictions."""
    full = type(tiny_lm)(_NoLogitsToKeep(tiny_lm.model), tiny_lm.tokenizer, tiny_lm.adapter, tiny_lm.manifest,
                         tiny_lm.path)
    assert tiny_lm.takes_logits_to_keep and not full.takes_logits_to_keep
    calls = []
    head = tiny_lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[:-1].numel()))
    try:
        fast = M.target_logprobs(tiny_lm, PROMPTS, TARGETS, reduce="sum", batch_size=3)
        assert sum(calls) == sum(len(tiny_lm.tokenizer(" " + t, add_special_tokens=False)["input_ids"])
                                 for t in TARGETS)
        calls.clear()
        torch.testing.assert_close(fast, M.target_logprobs(full, PROMPTS, TARGETS, reduce="sum", batch_size=3),
                                   atol=1e-5, rtol=0)
        assert sum(calls) > len(PROMPTS) * 4  # the fallback projects every position
        torch.testing.assert_close(M.next_token_logprobs(tiny_lm, PROMPTS, batch_size=3),
                                   M.next_token_logprobs(full, PROMPTS, batch_size=3), atol=1e-5, rtol=0)
        assert M.target_token_predictions(tiny_lm, PROMPTS, TARGETS) == M.target_token_predictions(full, PROMPTS,
                                                                                                      TARGETS)
    finally:
        handle.remove()


def test_tokenizer_without_pad_uses_eos(tiny_lm):
    tok = copy.deepcopy(tiny_lm.tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert M.pad_id(tok) == tok.eos_token_id
    lm2 = type(tiny_lm)(tiny_lm.model, tok, tiny_lm.adapter, tiny_lm.manifest, tiny_lm.path)
    torch.testing.assert_close(M.target_logprobs(lm2, PROMPTS, TARGETS), M.target_logprobs(tiny_lm, PROMPTS, TARGETS))


def test_bad_input_is_named(tiny_lm):
    with pytest.raises(ValueError, match="target 1"):
        M.target_logprobs(tiny_lm, PROMPTS[:2], ["Paris", "  "])
    with pytest.raises(ValueError, match="missing fields"):
        M.evaluate_counterfact(tiny_lm, [{"case_id": 7, "prompt": "x"}])


def test_ngram_entropy_hand_computed():
    # words a b a b: 2-grams {ab:2, ba:1}; 3-grams {aba:1, bab:1}
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert M.word_tokens("Hi, there!") == ["Hi", ",", "there", "!"]
    assert M.ngram_entropy("x x x x x x") == 0.0


def test_kl_and_canary_agreement():
    torch.manual_seed(0)
    a = torch.log_softmax(torch.randn(5, 11), -1)
    b = torch.log_softmax(torch.randn(5, 11), -1)
    direct = (a.exp() * (a - b)).sum(-1).mean()
    assert M.neighbourhood_kl(a, b) == pytest.approx(float(direct), rel=1e-5)
    assert M.neighbourhood_kl(a, a) == pytest.approx(0.0, abs=1e-9)
    x = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    y = torch.tensor([[1, 2], [3, 9], [0, 6], [7, 8]])
    assert M.canary_agreement(x, y) == 0.5
    assert M.canary_agreement(x, y, k=1) == 0.75


def test_evaluate_counterfact_matches_pairwise(tiny_lm):
    recs = [
        {"case_id": i, "prompt": p, "subject": p.split()[0], "target_new": t, "ground_truth": g,
         "rephrase_prompt": "Again, " + p, "locality_prompt": lp, "locality_ground_truth": lg}
        for i, (p, t, g, lp, lg) in enumerate([
            ("The Eiffel Tower is located in", "Rome", "Paris", "Rome is the capital of", "Italy"),
            ("Messi plays", "guitar", "soccer", "Toko Yasuda plays the", "piano"),
            ("The mother tongue of Thomas is", "French", "Dutch", "Danielle speaks", "French"),
        ])
    ]
    res = M.evaluate_counterfact(tiny_lm, recs, batch_size=4)
    for k, r in enumerate(recs):
        sc = lambda p, t: M.target_logprobs(tiny_lm, [p], [t])[0].item()  # noqa: E731
        assert res["efficacy_ok"][k] == (sc(r["prompt"], r["target_new"]) > sc(r["prompt"], r["ground_truth"]))
        assert res["generalization_ok"][k] == (sc(r["rephrase_prompt"], r["target_new"])
                                               > sc(r["rephrase_prompt"], r["ground_truth"]))
        assert res["specificity_ok"][k] == (sc(r["locality_prompt"], r["locality_ground_truth"])
                                            > sc(r["locality_prompt"], r["target_new"]))
    assert res["efficacy"] == sum(res["efficacy_ok"]) / 3
    assert res["failed_ids"] == [r["case_id"] for r, ok in zip(recs, res["efficacy_ok"]) if not ok]
    vals = [res["efficacy"], res["generalization"], res["specificity"]]
    expect = 0.0 if min(vals) == 0 else 3 / sum(1 / v for v in vals)
    assert res["score"] == pytest.approx(expect)
    assert M.harmonic_mean([0.5, 1.0, 1.0]) == pytest.approx(0.75)
    # retention's efficacy-only scoring gives the same verdicts
    eff = M.evaluate_efficacy(tiny_lm, recs, batch_size=2)
    assert eff["efficacy_ok"] == res["efficacy_ok"] and eff["ids"] == res["ids"]
    assert eff["efficacy"] == res["efficacy"]


def test_wilson_interval_matches_the_score_interval():
    # 92 of 100: the interval solves |p - p_hat| = z * sqrt(p (1 - p) / n) for p; check both roots
    lo, hi = M.wilson_interval(92, 100)
    for p in (lo, hi):
        assert abs(p - 0.92) == pytest.approx(1.96 * math.sqrt(p * (1 - p) / 100), rel=1e-9)
    assert (round(lo, 4), round(hi, 4)) == (0.85, 0.9589)
    assert M.wilson_interval(0, 10)[0] == 0.0 and M.wilson_interval(10, 10)[1] == 1.0
    assert M.wilson_interval(50, 1000)[1] - M.wilson_interval(50, 1000)[0] < 0.03
    with pytest.raises(ValueError, match="3 of 2"):
        M.wilson_interval(3, 2)


def test_generation_batched_equals_single_and_is_seeded(tiny_lm):
    g_batch = M.greedy_tokens(tiny_lm, PROMPTS, k=6, batch_size=4)
    g_single = torch.cat([M.greedy_tokens(tiny_lm, [p], k=6) for p in PROMPTS])
    assert torch.equal(g_batch, g_single)
    assert g_batch.shape == (4, 6)
    e1 = M.generation_entropy(tiny_lm, PROMPTS[:2], max_new_tokens=20, seed=3)
    e2 = M.generation_entropy(tiny_lm, PROMPTS[:2], max_new_tokens=20, seed=3)
    assert e1 == e2 and e1 > 0


def test_length_sorted_generation_keeps_the_prompts_order(tiny_lm):
    """``by_length`` batches prompts of similar token counts together; the rows still come back in the
    prompts' order, equal to each prompt generated alone, and the caller's random stream is untouched."""
    prompts = sorted(PROMPTS, key=lambda p: -len(tiny_lm.tokenizer(p)["input_ids"]))  # longest first
    lengths = [len(tiny_lm.tokenizer(p)["input_ids"]) for p in prompts]
    assert lengths != sorted(lengths)  # sorting by length reorders them
    single = torch.cat([M.greedy_tokens(tiny_lm, [p], k=5) for p in prompts])
    state = torch.random.get_rng_state()
    assert torch.equal(M.greedy_tokens(tiny_lm, prompts, k=5, batch_size=2, by_length=True), single)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        M.greedy_tokens(tiny_lm, prompts, k=0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        M.greedy_tokens(tiny_lm, prompts, k=2, batch_size=0)


def test_fluency_math_against_a_hand_computation():
    """METRICS.md: word tokens (words and punctuation), 2- and 3-gram entropies in bits, weighted 2/3 and
    4/3 and averaged, mean over prompts, x100 -- computed here longhand for two texts."""
    t1, t2 = "the cat sat, the cat ran.", "go go go"
    w1 = ["the", "cat", "sat", ",", "the", "cat", "ran", "."]
    assert M.word_tokens(t1) == w1
    # t1 2-grams: (the,cat) x2 and 5 singletons of 7; 3-grams: 6 distinct of 6
    h2 = -(2 / 7 * math.log2(2 / 7) + 5 * (1 / 7) * math.log2(1 / 7))
    h3 = math.log2(6)
    e1 = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert M.shannon_entropy_bits(M.ngram_counts(w1, 2)) == pytest.approx(h2)
    assert M.ngram_entropy(t1) == pytest.approx(e1)
    # t2: one 2-gram twice, one 3-gram once: both entropies 0
    assert M.ngram_entropy(t2) == 0.0
    assert M.mean_entropy_x100([t1, t2]) == pytest.approx(100 * (e1 + 0.0) / 2)
    assert M.ngram_entropy("") == 0.0 and M.ngram_entropy("one") == 0.0
    with pytest.raises(ValueError, match="no texts"):
        M.mean_entropy_x100([])


def test_fluency_samples_100_new_tokens_top5_in_one_batched_call(tiny_lm):
    """One left-padded generate call for all prompts, top-k 5, exactly N new tokens, the prompt not
    scored, and a fixed seed gives the same numbers twice."""
    calls = []
    real = tiny_lm.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    tiny_lm.model.generate = spy
    try:
        texts = M.sampled_continuations(tiny_lm, PROMPTS, max_new_tokens=12, seed=7)
        again = M.sampled_continuations(tiny_lm, PROMPTS, max_new_tokens=12, seed=7)
        other = M.sampled_continuations(tiny_lm, PROMPTS, max_new_tokens=12, seed=8)
    finally:
        del tiny_lm.model.generate
    assert len(calls) == 3  # one call per evaluation, all prompts together
    ids, mask = calls[0]["input_ids"], calls[0]["attention_mask"]
    assert ids.shape[0] == len(PROMPTS) and (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding
    assert calls[0]["do_sample"] and calls[0]["top_k"] == 5 and calls[0]["temperature"] == 1.0
    assert calls[0]["max_new_tokens"] == calls[0]["min_new_tokens"] == 12
    assert texts == again and texts != other
    assert not any(t.startswith(p) for t, p in zip(texts, PROMPTS))  # the continuation only
    assert M.generation_entropy(tiny_lm, PROMPTS, max_new_tokens=12, seed=7) == M.mean_entropy_x100(texts)
    # top-k 5: every sampled token is among the 5 most likely at its step (checked by teacher forcing)
    new = M.generate_tokens(tiny_lm, PROMPTS[:1], 6, do_sample=True, seed=7, batch_size=None)[0]
    prompt = tiny_lm.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([prompt + new.tolist()])).logits[0]
    for j, tok in enumerate(new.tolist()):
        assert tok in logits[len(prompt) - 1 + j].topk(5).indices.tolist()


def test_greedy_entropy_is_the_same_math_on_greedy_continuations(tiny_lm):
    texts = M.greedy_continuations(tiny_lm, PROMPTS, max_new_tokens=10)
    toks = M.greedy_tokens(tiny_lm, PROMPTS, k=10)
    assert texts == [tiny_lm.tokenizer.decode(r.tolist(), skip_special_tokens=True) for r in toks]
    assert M.greedy_entropy(tiny_lm, PROMPTS, max_new_tokens=10) == M.mean_entropy_x100(texts)


def test_perplexity_matches_model_loss(tiny_lm):
    text = "The Eiffel Tower is located in Paris, the capital of France. Rome is the capital of Italy."
    ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = tiny_lm.model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert M.perplexity(tiny_lm, text, window=512) == pytest.approx(math.exp(loss.item()), rel=1e-4)
    # windows: each window's first token is context only; two windows of a 2k-token slice
    n = len(ids)
    w = n // 2 + 1
    parts = [ids[:w], ids[w:]]
    nll, cnt = 0.0, 0
    for part in parts:
        with torch.no_grad():
            lo = tiny_lm.model(torch.tensor([part]), labels=torch.tensor([part])).loss.item()
        nll += lo * (len(part) - 1)
        cnt += len(part) - 1
    assert M.perplexity(tiny_lm, text, window=w) == pytest.approx(math.exp(nll / cnt), rel=1e-4)
