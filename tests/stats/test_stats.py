"""Key statistics: streaming second moment == direct computation; files, manifest, resume."""

from __future__ import annotations

import json

import pytest
import torch

from kedit.hooks import Trace
from kedit.stats.collect import compute_stats, load_stats
from kedit.stats.corpus import is_heldout, load_corpus
from kedit.stats.second_moment import RunningMoment, collect_second_moments, tokenize_batches


def test_running_moment_matches_direct():
    torch.manual_seed(0)
    x = torch.randn(300, 7)
    m = RunningMoment(7)
    for chunk in x.split(37):
        m.add(chunk)
    direct = (x.double().T @ x.double()) / 300
    assert m.count == 300
    assert torch.allclose(m.moment(), direct, atol=1e-5)


def _direct_moment(lm, layer: int, texts: list[str], seq_len: int) -> torch.Tensor:
    """Reference: one document at a time, no padding, keys stacked then multiplied once."""
    name = lm.adapter.mlp_out_name(layer)
    keys = []
    for t in texts:
        ids = lm.tokenizer(t, add_special_tokens=False, truncation=True, max_length=seq_len, return_tensors="pt")
        with torch.no_grad(), Trace(lm.model, [name], retain_input=True) as tr:
            lm.model(**ids)
        keys.append(tr.inputs[name][0])
    k = torch.cat(keys).double()
    return k.T @ k / k.shape[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_streaming_equals_direct_and_skips_padding(family, tiny_tokenizer, tiny_text, tiny_model_factory):
    from kedit.models.store import wrap_model

    lm = wrap_model(tiny_model_factory(family), tiny_tokenizer)
    got = collect_second_moments(lm, [1, 2], tiny_text, batch_size=3, seq_len=32)
    for layer in (1, 2):
        want = _direct_moment(lm, layer, tiny_text, 32)
        assert got[layer].dtype == torch.float64
        assert torch.allclose(got[layer], want, rtol=1e-4, atol=1e-6), family


def test_batches_are_padded_and_masked(tiny_tokenizer, tiny_text):
    batches = list(tokenize_batches(tiny_tokenizer, tiny_text, batch_size=8, seq_len=64))
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    want = sum(min(64, len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])) for t in tiny_text)
    assert total == want
    assert any((b["attention_mask"] == 0).any() for b in batches)


def test_compute_stats_writes_manifest_and_resumes(tiny_lm, workspace, tmp_path, tiny_text):
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n\n".join(tiny_text * 3))
    # Interrupted run: checkpoint after every batch, stop after 2 batches.
    with pytest.raises(KeyboardInterrupt):
        compute_stats(tiny_lm, [1, 2], workspace, str(corpus_file), max_tokens=10_000, seq_len=32, batch_size=2,
                      progress=False, checkpoint_every=1, _stop_after_batches=2)
    out = workspace.stats_dir / "tiny-llama" / "c"
    assert (out / ".partial" / "state.json").exists() and not (out / "manifest.json").exists()
    resumed = compute_stats(tiny_lm, [1, 2], workspace, str(corpus_file), max_tokens=10_000, seq_len=32,
                            batch_size=2, progress=False, checkpoint_every=1)
    fresh = collect_second_moments(tiny_lm, [1, 2], tiny_text * 3, batch_size=2, seq_len=32)
    for i in (1, 2):
        assert torch.allclose(resumed.mom2[i], fresh[i], rtol=1e-6, atol=1e-9)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == [1, 2] and manifest["n_tokens"] == resumed.n_tokens > 0
    assert manifest["model_hash"] == tiny_lm.manifest.model_hash
    assert not (out / ".partial").exists()
    # A second call with a subset of layers loads from disk; a new layer is merged in.
    again = compute_stats(tiny_lm, [2], workspace, str(corpus_file), max_tokens=10_000, seq_len=32, batch_size=2,
                          progress=False)
    assert torch.equal(again.mom2[2], resumed.mom2[2])
    merged = compute_stats(tiny_lm, [3], workspace, str(corpus_file), max_tokens=10_000, seq_len=32, batch_size=2,
                           progress=False)
    assert load_stats(merged.dir).layers == [1, 2, 3]


def test_corpus_errors_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(load_corpus(str(bad)).texts())
    flags = [is_heldout(f"title {i}") for i in range(2000)]
    assert 0.02 < sum(flags) / len(flags) < 0.08
