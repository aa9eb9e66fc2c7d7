"""Helpers of the gate and drift tests: a tiny Llama trained on a reference text (so damage shows up as
on a real model), a damaged copy of a model, and the canary prompts and gate policy they run with."""

from __future__ import annotations

import copy

import pytest
import torch

REF_TEXT = ("The Eiffel Tower is located in Paris, the capital of France. Rome is the capital of Italy; "
            "Berlin is the capital of Germany. The quick brown fox jumps over the lazy dog in London.") * 3


@pytest.fixture(scope="session")
def ref_text() -> str:
    """The reference text ``sharp_lm`` is trained on (and gates measure perplexity on)."""
    return REF_TEXT


@pytest.fixture(scope="session")
def canary_prompts() -> list[str]:
    return ["The capital of France is", "Rome is", "The quick brown fox", "Toko Yasuda plays",
            "Berlin is the", "Microsoft makes", "Lionel Messi is a", "Danielle Darrieux was born in"]


@pytest.fixture(scope="session")
def gate_policy() -> dict:
    """GatePolicy keyword arguments small enough for a tiny model."""
    return dict(fluency_prompts=2, fluency_tokens=12, reference_tokens=512)


@pytest.fixture(scope="module")
def sharp_lm(tiny_tokenizer, tiny_model_factory):
    """A tiny Llama trained for a few steps on REF_TEXT: low perplexity and confident predictions,
    so damage shows up as it would on a real model (tests only read it; damage works on a copy)."""
    from kedit.models.store import wrap_model

    model = tiny_model_factory("llama", seed=0)
    ids = torch.tensor([tiny_tokenizer(REF_TEXT)["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return wrap_model(model, tiny_tokenizer, slug="tiny-trained")


def _damaged(lm, scale: float = 50.0):
    from kedit.models.store import wrap_model

    model = copy.deepcopy(lm.model)
    w = model.model.layers[1].mlp.down_proj.weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w += scale * w.std() * torch.randn(w.shape, generator=g)
    return wrap_model(model, lm.tokenizer, slug="damaged")


@pytest.fixture(scope="session")
def damaged():
    """``damaged(lm, scale=50.0)``: a copy of ``lm`` with layer 1's MLP output weight heavily perturbed."""
    return _damaged
