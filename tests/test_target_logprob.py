"""v*'s chunked target log-probability (kedit.editors.target_logprob) against the full log-softmax:
values, top-token verdicts and gradients, over vocabulary chunks that do not divide the vocabulary."""

from __future__ import annotations

import pytest
import torch

from kedit.editors.runner import unembed_states
from kedit.editors.target_logprob import target_logprobs


@pytest.mark.parametrize("family", ["llama", "gptj", "gemma3_text"])  # gptj: an unembedding with a bias
def test_chunked_target_logprob_matches_log_softmax(family, tiny_tokenizer, one_thread):
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model(family), tiny_tokenizer, slug=f"tiny-{family}")
    torch.manual_seed(1)
    x = (3 * torch.randn(7, lm.adapter.out_dim())).requires_grad_(True)
    labels = torch.randint(0, lm.model.config.vocab_size, (7,))
    full = torch.log_softmax(unembed_states(lm, x), dim=-1)
    labels[0] = int(full[0].argmax())  # one row whose target is the top token
    want = full.gather(1, labels[:, None]).squeeze(1)
    (g_want,) = torch.autograd.grad((want * torch.arange(1.0, 8.0)).sum(), x)
    for chunk in (None, 37, 1000):
        got, top = target_logprobs(lm, x, labels, chunk=chunk)
        assert torch.allclose(got, want, atol=1e-5), chunk
        assert top.tolist() == (full.argmax(-1) == labels).tolist()
        (g_got,) = torch.autograd.grad((got * torch.arange(1.0, 8.0)).sum(), x)
        assert torch.allclose(g_got, g_want, atol=1e-5), chunk
    with torch.no_grad():  # no gradient wanted: the same values
        assert torch.allclose(target_logprobs(lm, x, labels, chunk=37)[0], want, atol=1e-5)
