"""Model adapters per family, the GPT-2 Conv1D transpose, the arch-spec escape hatch, and the model store
(including one test that drives the real embedded SmolLM2: import, statistics over a slice, reload)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from kedit.hooks import Trace
from kedit.models.adapters import ArchSpec, ModelAdapter, UnknownArchitectureError, load_arch_spec
from tests.conftest import make_tiny_model

EXPECTED = {
    "llama": ("model.layers.2.mlp.down_proj", "model.embed_tokens", "model.norm", False),
    "gpt2": ("transformer.h.2.mlp.c_proj", "transformer.wte", "transformer.ln_f", True),
    "gptj": ("transformer.h.2.mlp.fc_out", "transformer.wte", "transformer.ln_f", False),
    "gpt_neox": ("gpt_neox.layers.2.mlp.dense_4h_to_h", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", False),
    "gemma3_text": ("model.layers.2.mlp.down_proj", "model.embed_tokens", "model.norm", False),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_adapter_finds_modules(family):
    model = make_tiny_model(family)
    ad = ModelAdapter(model)
    mlp_out, embed, norm, transposed = EXPECTED[family]
    assert ad.num_layers == 4
    assert ad.mlp_out_name(2) == mlp_out and ad.spec.embed == embed and ad.spec.final_norm == norm
    assert ad.spec.transposed is transposed
    assert ad.weight_name(2) in dict(model.named_parameters())
    assert ad.embed is model.get_input_embeddings()
    assert ad.unembed.weight.shape[0] == model.config.vocab_size
    # the key is the edited matrix's input: W k reproduces the module's output (minus its bias)
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad(), Trace(model, [mlp_out], retain_input=True, retain_output=True) as tr:
        model(ids)
    k, out = tr.inputs[mlp_out][0], tr.outputs[mlp_out][0]
    bias = getattr(ad.mlp_out(2), "bias", None)
    pred = k @ ad.weight(2).T + (bias if bias is not None else 0)
    assert k.shape[-1] == ad.key_dim(2) and out.shape[-1] == ad.out_dim(2)
    assert torch.allclose(pred, out, atol=1e-5)


def test_gpt2_conv1d_is_handled_transposed():
    model = make_tiny_model("gpt2")
    ad = ModelAdapter(model)
    stored = ad.mlp_out(1).weight
    assert tuple(stored.shape) == (ad.key_dim(1), ad.out_dim(1))  # Conv1D stores [in, out]
    assert tuple(ad.weight(1).shape) == (ad.out_dim(1), ad.key_dim(1))
    delta = torch.randn(ad.out_dim(1), ad.key_dim(1))
    assert torch.equal(ad.to_stored(delta), delta.T)
    assert torch.equal(ad.from_stored(ad.to_stored(delta)), delta)


def test_unknown_architecture_names_the_fields(tmp_path):
    model = make_tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnknownArchitectureError, match="mlp_out.*final_norm|layers, mlp_out"):
        ModelAdapter(model)
    spec_file = tmp_path / "arch.yaml"
    spec_file.write_text("layers: model.layers\nmlp_out: mlp.down_proj\nmlp: mlp\nattn: self_attn\n"
                         "embed: model.embed_tokens\nfinal_norm: model.norm\nunembed: lm_head\n")
    ad = ModelAdapter(model, load_arch_spec(spec_file))
    assert ad.mlp_out_name(0) == "model.layers.0.mlp.down_proj"
    spec_file.write_text("layers: model.layers\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_arch_spec(spec_file)
    bad = ArchSpec(layers="model.nope", mlp_out="x", mlp="x", attn="x", embed="x", final_norm="x", unembed="x")
    with pytest.raises(UnknownArchitectureError, match="model.nope"):
        ModelAdapter(model, bad)


def test_import_hf_directory_and_reload(tmp_path, tiny_tokenizer):
    from kedit.models.store import import_hf, load_model
    from kedit.workspace import Workspace

    src = tmp_path / "tiny-gpt2"
    make_tiny_model("gpt2").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    ws = Workspace(tmp_path / "ws")
    m = import_hf(ws, src)
    assert m.slug == "tiny-gpt2" and m.model_type == "gpt2" and len(m.model_hash) == 64
    with pytest.raises(FileExistsError):
        import_hf(ws, src)
    lm = load_model("tiny-gpt2", ws, verify=True)
    assert lm.adapter.spec.transposed
    (ws.model_dir("tiny-gpt2") / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json"):
        load_model("tiny-gpt2", ws, verify=True)
    with pytest.raises(FileNotFoundError, match="kedit model import"):
        load_model("nope", ws)


@pytest.mark.slow
def test_real_smollm2_import_stats_reload(smollm_ws, tmp_path):
    """The embedded model end to end: store entry, statistics over a small slice, sub-second reload."""
    from kedit.models.store import load_model
    from kedit.stats.collect import compute_stats

    manifest = json.loads((smollm_ws.model_dir("smollm2-135m") / "kedit_manifest.json").read_text())
    assert manifest["model_type"] == "llama" and manifest["n_params"] > 100e6
    t = time.perf_counter()
    lm = load_model("smollm2-135m", smollm_ws)
    assert time.perf_counter() - t < 10  # well under the ~15 s of dequantising (timing is in the benchmark)
    assert lm.adapter.num_layers == 30 and lm.adapter.key_dim() == 1536
    from kedit.workspace import Workspace

    b = compute_stats(lm, [4, 5], Workspace(tmp_path), max_tokens=1500, seq_len=64, batch_size=8,
                      progress=False)  # its own stats folder: never overwrite the shared model cache's
    assert b.n_tokens >= 1500 and b.mom2[4].shape == (1536, 1536)
    assert torch.allclose(b.mom2[4], b.mom2[4].T)
    assert torch.linalg.eigvalsh(b.mom2[4]).min() > -1e-8
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0])


@pytest.mark.slow
def test_real_gemma3_import_and_reload(gemma_ws):
    """The second embedded family (skipped with the reason when ``kedit[gemma]`` is not installed): the
    GGUF's four parts are joined, dequantised and stored; the entry reloads and completes a fact."""
    from kedit.models.store import load_model

    manifest = json.loads((gemma_ws.model_dir("gemma-3-270m") / "kedit_manifest.json").read_text())
    assert manifest["model_type"] == "gemma3_text" and 250e6 < manifest["n_params"] < 300e6
    assert not any(p.suffix == ".gguf" for p in gemma_ws.models_dir.rglob("*"))  # the joined GGUF is gone
    lm = load_model("gemma-3-270m", gemma_ws)
    assert lm.adapter.num_layers == 18 and lm.adapter.key_dim() == 2048 and lm.adapter.out_dim() == 640
    assert lm.model.config.vocab_size == 262144
    ids = lm.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0][ids["input_ids"].shape[1]:])
