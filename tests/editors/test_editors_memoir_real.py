"""The sparse residual memory on the real embedded SmolLM2-135M: three edits flip their prompts, the
canaries that do not mention an edited subject keep their greedy answers, and removing the memory
gives the base model back exactly."""

import pytest
import torch

pytestmark = pytest.mark.slow

EDITS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris"},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "Dutch",
     "ground_truth": "French"},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano", "ground_truth": "guitar"},
]


def test_memoir_flips_facts_and_keeps_canaries(smollm, tmp_path):
    from itertools import islice

    from kedit.editors.attach import detach
    from kedit.editors.hparams import load_hparams
    from kedit.editors.io import request_from_record
    from kedit.editors.registry import get_editor
    from kedit.evaluation.canary import shipped_prompts
    from kedit.evaluation.metrics import greedy_tokens, target_logprobs
    from kedit.stats.corpus import load_corpus

    lm = smollm
    hp = load_hparams("memoir", lm, overrides={"n_prefixes": 3})
    editor = get_editor("memoir", hp, cache_dir=tmp_path)
    editor.background_texts = list(islice(load_corpus("wiki-summaries-en").texts(), 60))
    reqs = [request_from_record(r) for r in EDITS]
    # a canary about an edited subject reads that subject's entry by design (like a ROME edit, the memory
    # changes what the model says about the subject), so only the others must keep their answers
    canaries = [p for p in shipped_prompts() if not any(r["subject"] in p for r in EDITS)]

    def wins():
        new = target_logprobs(lm, [r["prompt"] for r in EDITS], [r["target_new"] for r in EDITS])
        old = target_logprobs(lm, [r["prompt"] for r in EDITS], [r["ground_truth"] for r in EDITS])
        return (new > old).tolist()

    assert not any(wins())
    canary_before = greedy_tokens(lm, canaries, k=3)
    base_logits = lm.model(input_ids=lm.tokenizer(canaries[0], return_tensors="pt").input_ids).logits
    res = editor.compute(lm, reqs, None, None)
    assert res.deltas == {}
    try:
        editor.attach(lm, res.state)
        assert all(wins())
        changed = (greedy_tokens(lm, canaries, k=3) != canary_before).any(1)
        assert not changed.any(), [p for p, c in zip(canaries, changed.tolist()) if c]
    finally:  # the session fixture is shared: take the memory off
        detach(lm.model, "memoir")
    with torch.no_grad():
        again = lm.model(input_ids=lm.tokenizer(canaries[0], return_tensors="pt").input_ids).logits
    assert torch.equal(again, base_logits)
