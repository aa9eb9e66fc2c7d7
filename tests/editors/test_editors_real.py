"""AlphaEdit on the real embedded SmolLM2-135M: edits flip predictions, a canary stays put."""

import pytest
import torch

pytestmark = pytest.mark.slow

CANARY = "The capital of Germany is"


def test_alphaedit_flips_facts_and_keeps_canary(smollm, tmp_path, real_edits):
    from itertools import islice

    from kedit.editors.base import apply_deltas
    from kedit.editors.common import weights_restored
    from kedit.editors.hparams import load_hparams
    from kedit.editors.io import request_from_record
    from kedit.editors.registry import get_editor
    from kedit.evaluation.metrics import next_token_logprobs, target_logprobs
    from kedit.stats.corpus import load_corpus
    from kedit.stats.second_moment import collect_second_moments

    lm = smollm
    hp = load_hparams("alphaedit", lm, overrides={"n_prefixes": 3})
    layers = hp.resolve_layers(lm.adapter.num_layers)
    texts = list(islice(load_corpus("wiki-summaries-en").texts(), 120))
    stats = collect_second_moments(lm, layers, texts, batch_size=8, seq_len=128)
    reqs = [request_from_record(r) for r in real_edits]

    def wins():
        new = target_logprobs(lm, [r["prompt"] for r in real_edits], [r["target_new"] for r in real_edits])
        old = target_logprobs(lm, [r["prompt"] for r in real_edits], [r["ground_truth"] for r in real_edits])
        return (new > old).tolist()

    assert not any(wins())
    canary_before = next_token_logprobs(lm, [CANARY]).argmax(-1)
    res = get_editor("alphaedit", hp, cache_dir=tmp_path).compute(lm, reqs, None, stats)
    assert all(d.constraint_met or d.target_prob > 0.5 for d in res.diagnostics)
    with weights_restored(lm, layers):  # the session fixture is shared: put the weights back exactly
        apply_deltas(lm.model, res.deltas)
        assert all(wins())
        assert torch.equal(next_token_logprobs(lm, [CANARY]).argmax(-1), canary_before)
    assert all(0 < res.layer_info[f"L{i}"]["nullspace_dim"] < lm.adapter.key_dim() for i in layers)
