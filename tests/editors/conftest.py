"""Helpers of the editors' tests: the weight editors' tiny-model case (ROME / MEMIT / AlphaEdit) and
the facts the real-model tests edit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def _weight_edit_case() -> SimpleNamespace:
    from kedit.editors.base import EditRequest
    from kedit.editors.hparams import EditHparams, load_hparams

    reqs = [
        EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris", id="a"),
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "Dutch", "French", id="b"),
        EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar", id="c"),
    ]

    def hp(method: str, **kw) -> EditHparams:
        base = {"layers": [1] if method == "rome" else [1, 2], "n_prefixes": 2, "prefix_len": 3, "v_steps": 6,
                "mom2_update_weight": 1e-3, "L2": 1e-4}
        return load_hparams(method, overrides={**base, **kw})

    def stats(lm, seed=0, rank=None):
        """Key second moments from random keys (of rank ``rank`` plus a little noise when given)."""
        d = lm.adapter.key_dim()
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(3000, d, generator=g, dtype=torch.float64)
        if rank is not None:
            X[:, rank:] = 0
            X += 1e-3 * torch.randn(3000, d, generator=g, dtype=torch.float64)
        C = X.T @ X / 3000
        return {i: C.clone() for i in range(lm.adapter.num_layers)}

    def prefixes(lm, hparams, tmp_path):
        from kedit.editors.context import context_prefixes

        return context_prefixes(lm, hparams.n_prefixes, hparams.prefix_len, hparams.prefix_seed, tmp_path)

    return SimpleNamespace(reqs=reqs, hp=hp, stats=stats, prefixes=prefixes)


@pytest.fixture(scope="session")
def weight_edit() -> SimpleNamespace:
    """ROME / MEMIT / AlphaEdit on tiny models: ``reqs`` (three facts), ``hp(method, **overrides)``,
    ``stats(lm, seed=0, rank=None)`` (key second moments per layer) and ``prefixes(lm, hp, tmp_path)``."""
    return _weight_edit_case()


@pytest.fixture(scope="session")
def real_edits() -> list[dict]:
    """Three CounterFact-style edits the real SmolLM2-135M gets wrong before editing."""
    return [
        {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
         "target_new": "Rome", "ground_truth": "Paris"},
        {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "Dutch", "ground_truth": "French"},
        {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
         "ground_truth": "guitar"},
    ]
