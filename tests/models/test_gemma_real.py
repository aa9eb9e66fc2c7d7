"""The second embedded family end to end on the real Gemma 3 270M (skipped with the reason when
``kedit[gemma]`` is not installed): the nightly editor (memoir) flips a handful of facts, the canaries
that do not mention an edited subject keep their greedy answers, and the exported directory reloads in
plain transformers with the edits in it."""

import pytest
import torch

pytestmark = pytest.mark.slow

EDITS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
     "ground_truth": "Paris"},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "Dutch",
     "ground_truth": "French"},
    {"prompt": "The Colosseum is located in the city of", "subject": "The Colosseum", "target_new": "London",
     "ground_truth": "Rome"},
]


def test_memoir_edits_real_gemma_and_the_export_reloads(gemma_ws, tmp_path):
    from transformers import AutoModelForCausalLM

    from kedit.editors.attach import detach
    from kedit.editors.hparams import load_hparams
    from kedit.editors.io import request_from_record
    from kedit.editors.registry import get_editor
    from kedit.evaluation.canary import shipped_prompts
    from kedit.evaluation.metrics import greedy_tokens, target_logprobs
    from kedit.export import added_parameters, save_with_added
    from kedit.models.store import load_model

    lm = load_model("gemma-3-270m", gemma_ws)
    hp = load_hparams("memoir", lm, overrides={"n_prefixes": 3, "mm_bg_docs": 20})
    editor = get_editor("memoir", hp, cache_dir=tmp_path)
    reqs = [request_from_record(r) for r in EDITS]
    canaries = [p for p in shipped_prompts() if not any(r["subject"] in p for r in EDITS)][:30]
    prompts = [r["prompt"] for r in EDITS]

    def wins(model_lm):
        new = target_logprobs(model_lm, prompts, [r["target_new"] for r in EDITS])
        old = target_logprobs(model_lm, prompts, [r["ground_truth"] for r in EDITS])
        return (new > old).tolist()

    assert not any(wins(lm))
    canary_before = greedy_tokens(lm, canaries, k=1)
    res = editor.compute(lm, reqs, None, None)
    try:
        editor.attach(lm, res.state)
        assert all(wins(lm))
        changed = (greedy_tokens(lm, canaries, k=1) != canary_before).any(1)
        assert changed.float().mean() <= 0.1, [p for p, c in zip(canaries, changed.tolist()) if c]
        ids = lm.tokenizer(prompts[0], return_tensors="pt").input_ids
        with torch.no_grad():
            edited_logits = lm.model(input_ids=ids).logits[0, -1]
        detach(lm.model, "memoir")
        out = tmp_path / "export"
        save_with_added(lm, added_parameters(lm, res.state), out)
    finally:
        detach(lm.model, "memoir")
    served = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        got = served(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(got, edited_logits, atol=1e-4, rtol=1e-4)
