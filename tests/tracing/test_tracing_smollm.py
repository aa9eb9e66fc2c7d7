"""One slow check on the real SmolLM2-135M: a known fact traces as causal tracing says it should."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_smollm_trace_known_fact(smollm):
    from kedit.evaluation.metrics import evaluate_counterfact
    from kedit.tracing import trace_fact

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = trace_fact(smollm, "{} is located in the city of", "The Eiffel Tower", target="Paris",
                         kinds=("hidden",), samples=2)
        rec = {"case_id": 0, "prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
               "target_new": "Rome", "ground_truth": "Paris", "rephrase_prompt": "The Eiffel Tower can be found in",
               "locality_prompt": "The Brandenburg Gate is located in the city of", "locality_ground_truth": "Berlin"}
        cf = evaluate_counterfact(smollm, [rec])
    finally:
        torch.set_num_threads(n)
    assert res.clean_prob > 0.3 and res.corrupted_prob < res.clean_prob / 2
    last = res.restored["hidden"][-1][-1]  # the final layer's output at the last token is the whole answer
    assert last == pytest.approx(res.clean_prob, abs=1e-4)
    assert cf["efficacy"] == 0.0 and cf["specificity"] == 1.0  # unedited: Paris beats Rome; Berlin beats Rome
