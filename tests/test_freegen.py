"""Free-generation scores (kedit.evaluation.freegen) against a direct computation: each prompt alone,
a plain loop of full forwards without a cache, one argmax at a time, and the matching rules written out
with regular expressions."""

from __future__ import annotations

import re

import pytest
import torch

from kedit.evaluation.freegen import (
    FREEGEN_KEYS,
    begins_with,
    contains,
    evaluate_free_generation,
    free_generation_records,
    free_generation_scores,
)

PROMPTS = ["The Eiffel Tower is located in", "Danielle Darrieux speaks", "Toko Yasuda plays the",
           "Rome is the capital of", "The quick brown fox jumps over the lazy dog, again and"]
PARAS = ["Apple A5 was created by", "The mother tongue of Thomas Joannes Stieltjes is",
         "Lionel Messi is a professional soccer player who plays for", "Berlin is", "Madrid of"]
NBRS = ["Microsoft makes", "London and", "The capital of France is", "in New York", "Windows and"]


def _direct(lm, prompt: str, n: int) -> str:
    ids = list(lm.tokenizer(prompt)["input_ids"])
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            new.append(nxt)
    return lm.tokenizer.decode(new, skip_special_tokens=True)


def _begins(text: str, obj: str) -> bool:
    return re.match(r"\s*" + re.escape(obj) + r"(?![^\W_])", text) is not None


def _contains(text: str, obj: str) -> bool:
    return re.search(r"(?<![^\W_])" + re.escape(obj) + r"(?![^\W_])", text) is not None


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_free_generation_matches_a_per_prompt_loop(family, tiny_tokenizer, one_thread):
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model(family), tiny_tokenizer, slug=f"tiny-{family}")
    n = 6
    texts = {p: _direct(lm, p, n) for p in PROMPTS + PARAS + NBRS}
    # objects the tiny model does write: the first word of an edit continuation (begins), a later word of a
    # paraphrase's (contains only), a neighbour's first word (a leak); the rest are words it never writes
    words = {p: re.findall(r"[^\W_]+", t) for p, t in texts.items()}
    objects = []
    for i, (p, q, r) in enumerate(zip(PROMPTS, PARAS, NBRS)):
        pick = [words[p][:1], words[q][-1:], words[r][:1], []][i % 4]
        objects.append(pick[0] if pick else "Zanzibar")
    recs = free_generation_records(lm, PROMPTS, PARAS, NBRS, objects, max_new_tokens=n, batch_size=2)
    assert [t for tr in zip(*recs.texts) for t in tr] == [texts[p] for p in PROMPTS + PARAS + NBRS]
    want = {
        "gen_efficacy": [_begins(texts[p], o) for p, o in zip(PROMPTS, objects)],
        "gen_efficacy_contains": [_contains(texts[p], o) for p, o in zip(PROMPTS, objects)],
        "gen_generalization": [_begins(texts[p], o) for p, o in zip(PARAS, objects)],
        "gen_generalization_contains": [_contains(texts[p], o) for p, o in zip(PARAS, objects)],
        "gen_specificity": [not _begins(texts[p], o) for p, o in zip(NBRS, objects)],
        "gen_specificity_contains": [not _contains(texts[p], o) for p, o in zip(NBRS, objects)],
    }
    assert any(want["gen_efficacy"]) or any(want["gen_generalization_contains"]) or not all(want["gen_specificity"])
    scores = evaluate_free_generation(lm, PROMPTS, PARAS, NBRS, objects, max_new_tokens=n, batch_size=2)
    assert set(scores) == set(FREEGEN_KEYS)
    for k, v in want.items():
        assert scores[k] == pytest.approx(sum(v) / len(v)), k
    # chunks of one run join into the scores over all of it
    a = free_generation_records(lm, PROMPTS[:2], PARAS[:2], NBRS[:2], objects[:2], max_new_tokens=n)
    b = free_generation_records(lm, PROMPTS[2:], PARAS[2:], NBRS[2:], objects[2:], max_new_tokens=n)
    assert free_generation_scores([a, vars(b)]) == scores


def test_matching_is_whole_word_and_case_sensitive():
    assert begins_with(" Rome, Italy", "Rome") and begins_with("Rome", "Rome")
    assert not begins_with(" Romeo and", "Rome") and not begins_with(" rome", "Rome")
    assert not begins_with(" the city of Rome", "Rome") and contains(" the city of Rome.", "Rome")
    assert not contains(" Romeo", "Rome") and not contains("Jerome", "Rome") and contains("(Rome)", "Rome")
    assert contains(" in New York City", "New York") and begins_with(" C++ code", "C++")


def test_bad_input_says_what():
    with pytest.raises(ValueError, match="one of each per record"):
        free_generation_records(None, ["a"], ["b"], [], ["x"])
    with pytest.raises(ValueError, match="record 0 has an empty new object"):
        free_generation_records(None, ["a"], ["b"], ["c"], [" "])
