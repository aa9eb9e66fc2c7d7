"""Editors end to end on tiny random models: contract, closed-form properties, state, batching."""

import dataclasses

import pytest
import torch

from kedit.editors.base import EditorState, EditRequest, apply_deltas
from kedit.editors.hparams import EditHparams, load_hparams
from kedit.editors.keys import SubjectStates
from kedit.editors.prompts import subject_rows
from kedit.editors.registry import get_editor
from kedit.editors.vstar import optimise_vstar

REQS = [
    EditRequest("{} is located in", "The Eiffel Tower", "Rome", "Paris", id="a"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "Dutch", "French", id="b"),
    EditRequest("{} plays the", "Toko Yasuda", "piano", "guitar", id="c"),
]
PREFIXES = ["", "The quick brown fox. ", "Rome is the capital. "]


def _hp(method: str, **kw) -> EditHparams:
    base = {"layers": [1] if method == "rome" else [1, 2], "n_prefixes": 2, "prefix_len": 3, "v_steps": 6,
            "mom2_update_weight": 1e-3, "L2": 1e-4}
    return load_hparams(method, overrides={**base, **kw})


def _stats(lm, seed=0, rank=None):
    d = lm.adapter.key_dim()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3000, d, generator=g, dtype=torch.float64)
    if rank is not None:
        X[:, rank:] = 0
        X += 1e-3 * torch.randn(3000, d, generator=g, dtype=torch.float64)
    C = X.T @ X / 3000
    return {i: C.clone() for i in range(lm.adapter.num_layers)}


def _keys_and_z(lm, reqs, layers, prefixes):
    st = SubjectStates(lm, subject_rows(lm.tokenizer, reqs, prefixes), layers[0], layers[-1])
    return st.read(lm, layers)


def _prefixes(lm, hp, tmp_path):
    from kedit.editors.context import context_prefixes

    return context_prefixes(lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, tmp_path)


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_compute_leaves_weights_and_returns_stored_deltas(method, tiny_lm, tmp_path):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    stats = _stats(tiny_lm, rank=tiny_lm.adapter.key_dim() // 2)  # AlphaEdit needs a null space
    res = get_editor(method, _hp(method), cache_dir=tmp_path).compute(tiny_lm, REQS[:2], None, stats)
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.model.state_dict().items())
    params = dict(tiny_lm.model.named_parameters())
    assert res.deltas and all(tuple(d.shape) == tuple(params[k].shape) for k, d in res.deltas.items())
    assert len(res.diagnostics) == 2 and res.diagnostics[0].request_id == "a"
    assert res.state.meta["n_edits"] == 2
    apply_deltas(tiny_lm.model, res.deltas)
    assert not torch.equal(params[next(iter(res.deltas))], before[next(iter(res.deltas))])


def test_gpt2_deltas_are_in_transposed_stored_layout(tiny_tokenizer, tmp_path):
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model("gpt2"), tiny_tokenizer, slug="tiny-gpt2")
    res = get_editor("memit", _hp("memit"), cache_dir=tmp_path).compute(lm, REQS[:2], None, _stats(lm))
    name = lm.adapter.weight_name(1)
    assert res.deltas[name].shape == lm.adapter.mlp_out(1).weight.shape == (4 * 64, 64)
    K, _ = _keys_and_z(lm, REQS[:2], [1], _prefixes(lm, _hp("memit"), tmp_path))
    # the [out, in] view of the stored delta maps keys to outputs
    assert lm.adapter.from_stored(res.deltas[name]).shape == (64, K[1].shape[0])


def test_rome_writes_v_star_for_its_key(tiny_lm, tmp_path):
    hp = _hp("rome")
    res = get_editor("rome", hp, cache_dir=tmp_path).compute(tiny_lm, REQS[:1], None, _stats(tiny_lm))
    D = tiny_lm.adapter.from_stored(res.deltas[tiny_lm.adapter.weight_name(1)]).double()
    sv = torch.linalg.svdvals(D)
    assert sv[1] < 1e-5 * sv[0]  # rank one (up to float32 storage)
    assert res.layer_info["z"]["relative_residual_after"] < 1e-3  # W'k* = v*


def test_memit_reduces_the_residual(tiny_lm, tmp_path):
    loose = get_editor("memit", _hp("memit", mom2_update_weight=1e-4), cache_dir=tmp_path)
    res = loose.compute(tiny_lm, REQS, None, _stats(tiny_lm))
    assert res.layer_info["z"]["relative_residual_after"] < 0.05
    strict = get_editor("memit", _hp("memit", mom2_update_weight=1e4), cache_dir=tmp_path)
    res2 = strict.compute(tiny_lm, REQS, None, _stats(tiny_lm))
    assert 0.5 < res2.layer_info["z"]["relative_residual_after"] <= 1.0 + 1e-6  # λ holds it back
    # residual spread: the first of two layers takes about half of the full residual
    assert res.layer_info["L1"]["resid_norm"] == pytest.approx(res.layer_info["L2"]["resid_norm"], rel=0.6)


def test_memit_context_keys_write_delta_into_every_context(tiny_lm, tmp_path):
    """key_mode "contexts": each prompt context's own output moves by the v* δ (least squares over all
    context keys), so the context whose key is far from the average is written too; the state holds
    the weighted per-context Σ k kᵀ (1/contexts per request)."""
    lm = tiny_lm
    hp = _hp("alphaedit", key_mode="contexts", nullspace_threshold=1e-3, L2=1e-6)
    stats = _stats(lm, rank=lm.adapter.key_dim() // 2)
    res = get_editor("alphaedit", hp, cache_dir=tmp_path).compute(lm, REQS[:1], None, stats)
    assert res.layer_info["contexts"]["worst_relative_residual_after"] < 0.05
    avg = get_editor("alphaedit", _hp("alphaedit", nullspace_threshold=1e-3, L2=1e-6), cache_dir=tmp_path)
    res_avg = avg.compute(lm, REQS[:1], None, stats)
    assert "contexts" not in res_avg.layer_info
    prefixes = _prefixes(lm, hp, tmp_path)
    apply_deltas(lm.model, res.deltas)
    st = SubjectStates(lm, subject_rows(lm.tokenizer, REQS[:1], prefixes), 1, 2)
    K, _ = st.read(lm, [2], per_row=True)
    assert torch.allclose(res.state.tensors["cache_c.L2"].double(), K[2] @ K[2].T / len(prefixes),
                          rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="key_mode"):
        get_editor("memit", _hp("memit", key_mode="bogus"), cache_dir=tmp_path).compute(lm, REQS[:1], None, stats)


def test_alphaedit_preserves_subspace_and_earlier_batches(tiny_lm, tmp_path):
    lm = tiny_lm
    d = lm.adapter.key_dim()
    stats = _stats(lm, rank=d // 2)
    hp = _hp("alphaedit", nullspace_threshold=1e-3, L2=1e-4)
    ed = get_editor("alphaedit", hp, cache_dir=tmp_path)
    r1 = ed.compute(lm, REQS[:2], None, stats)
    assert r1.layer_info["L1"]["nullspace_dim"] == d - d // 2
    assert set(r1.state.tensors) == {"cache_c.L1", "cache_c.L2"}
    g = torch.Generator().manual_seed(9)
    K0 = torch.zeros(d, 50, dtype=torch.float64)
    K0[: d // 2] = torch.randn(d // 2, 50, generator=g, dtype=torch.float64)
    for delta in r1.deltas.values():
        D = lm.adapter.from_stored(delta).double()
        assert (D @ K0).norm() < 1e-2 * D.norm() * K0.norm()
    prefixes = _prefixes(lm, hp, tmp_path)
    apply_deltas(lm.model, r1.deltas)
    K1, _ = _keys_and_z(lm, REQS[:2], [1, 2], prefixes)
    # state holds exactly Σ K Kᵀ of the edited model's keys
    assert torch.allclose(r1.state.tensors["cache_c.L2"].double(), K1[2] @ K1[2].T, rtol=1e-4, atol=1e-5)
    r2 = ed.compute(lm, REQS[2:], r1.state, stats)
    assert r2.state.meta["n_edits"] == 3 and r2.state.meta["n_batches"] == 2
    assert torch.allclose(r2.state.tensors["cache_c.L1"].double(),
                          r1.state.tensors["cache_c.L1"].double() + _keys_and_z_after(lm, r2, REQS[2:], prefixes),
                          rtol=1e-3, atol=1e-4)
    forgetful = ed.compute(lm, REQS[2:], None, stats)
    for layer in (1, 2):
        name = lm.adapter.weight_name(layer)
        kept = (lm.adapter.from_stored(r2.deltas[name]).double() @ K1[layer]).norm()
        lost = (lm.adapter.from_stored(forgetful.deltas[name]).double() @ K1[layer]).norm()
        assert kept < 0.2 * lost


def _keys_and_z_after(lm, res, reqs, prefixes):
    apply_deltas(lm.model, res.deltas)
    try:
        K, _ = _keys_and_z(lm, reqs, [1], prefixes)
    finally:
        apply_deltas(lm.model, res.deltas, sign=-1.0)
    return K[1] @ K[1].T


def test_batched_vstar_matches_one_at_a_time(tiny_lm):
    hp = _hp("memit", v_steps=5, v_lr=0.05, v_weight_decay=0.0, clamp_norm_factor=100.0)
    together = optimise_vstar(tiny_lm, REQS, PREFIXES, hp, 2)
    for i, r in enumerate(REQS):
        alone = optimise_vstar(tiny_lm, [r], PREFIXES, hp, 2)
        assert torch.allclose(together.delta[i], alone.delta[0], atol=1e-4, rtol=1e-3)
        assert torch.allclose(together.v0[i], alone.v0[0], atol=1e-5)
        assert together.diagnostics[i].vstar_loss_end == pytest.approx(alone.diagnostics[0].vstar_loss_end, rel=1e-4)


def test_vstar_early_stop_masks_converged_requests(tiny_lm):
    hp = _hp("memit", v_steps=6, v_stop_nll=100.0)  # everything "converges" at step 0
    vs = optimise_vstar(tiny_lm, REQS, PREFIXES, hp, 2)
    assert all(d.vstar_steps == 0 and d.constraint_met for d in vs.diagnostics)
    assert torch.count_nonzero(vs.delta) == 0


def test_vstar_init_starts_adam_there_and_keeps_the_unedited_kl_reference(tiny_lm):
    hp = _hp("memit", v_steps=5, v_lr=0.05, kl_factor=1.0, clamp_norm_factor=100.0)
    cold = optimise_vstar(tiny_lm, REQS, PREFIXES, hp, 2)
    zero = optimise_vstar(tiny_lm, REQS, PREFIXES, hp, 2, init=torch.zeros_like(cold.delta))
    assert torch.equal(zero.delta, cold.delta)
    # started where the cold run ended: its first loss is the cold run's last one, KL term included
    # (a KL measured from the start instead would read 0 there), and a second run moves on from there
    warm = optimise_vstar(tiny_lm, REQS, PREFIXES, hp, 2, init=cold.delta)
    for c, w in zip(cold.diagnostics, warm.diagnostics):
        assert w.vstar_loss_start == pytest.approx(c.vstar_loss_end, rel=1e-4, abs=1e-6)
        assert w.vstar_loss_end < c.vstar_loss_end
    met = _hp("memit", v_steps=5, v_lr=0.05, clamp_norm_factor=100.0,
              v_stop_nll=max(d.vstar_loss_end for d in cold.diagnostics) + 1.0)
    done = optimise_vstar(tiny_lm, REQS, PREFIXES, met, 2, init=cold.delta)
    assert all(d.vstar_steps == 0 and d.constraint_met for d in done.diagnostics)
    assert torch.equal(done.delta, cold.delta)
    with pytest.raises(ValueError, match="init has shape"):
        optimise_vstar(tiny_lm, REQS, PREFIXES, hp, 2, init=cold.delta[:2])


def _top_tokens_hit(lm, reqs, vs, layer):
    """Whether, with each δ added to the layer-``layer`` output at its subject, every target token is
    the model's top prediction in every context (checked with a hook on the real forward)."""
    from kedit.editors.prompts import target_ids

    rows = subject_rows(lm.tokenizer, reqs, PREFIXES)
    tgts = target_ids(lm.tokenizer, [r.target_new for r in reqs])
    hit = [True] * len(reqs)
    for ids, pos, r in zip(rows.ids, rows.subj_pos, rows.req):
        def add(mod, args, out, pos=pos, r=r):
            h = out[0] if isinstance(out, tuple) else out
            h[:, pos] += vs.delta[r].to(h.dtype)
        handle = lm.adapter.module(lm.adapter.layer_name(layer)).register_forward_hook(add)
        try:
            with torch.no_grad():
                logits = lm.model(torch.tensor([ids + tgts[r][:-1]])).logits[0]
        finally:
            handle.remove()
        top = logits[len(ids) - 1: len(ids) - 1 + len(tgts[r])].argmax(-1).tolist()
        hit[r] = hit[r] and top == tgts[r]
    return hit


def test_vstar_most_probable_stop_ends_when_targets_are_top(tiny_lm):
    # subject last and one-token targets: the tiny random model's flat logits can be steered to them
    reqs = [EditRequest("A photo of {}", "The Eiffel Tower", "capital", id="a"),
            EditRequest("We talked about {}", "Danielle Darrieux", "the", id="b"),
            EditRequest("Next up: {}", "Toko Yasuda", "of", id="c")]
    hp = _hp("memit", v_steps=30, v_lr=0.1, v_stop_nll=1e-3, clamp_norm_factor=100.0, v_weight_decay=0.0)
    mpes = optimise_vstar(tiny_lm, reqs, PREFIXES, EditHparams(**{**hp.to_dict(), "v_stop": "most_probable"}), 2)
    full = optimise_vstar(tiny_lm, reqs, PREFIXES, hp, 2)
    assert all(d.constraint_met for d in mpes.diagnostics)
    assert _top_tokens_hit(tiny_lm, reqs, mpes, 2) == [True] * len(reqs)
    unedited = dataclasses.replace(mpes, delta=torch.zeros_like(mpes.delta))
    assert _top_tokens_hit(tiny_lm, reqs, unedited, 2) == [False] * len(reqs)
    steps = [(a.vstar_steps, b.vstar_steps) for a, b in zip(mpes.diagnostics, full.diagnostics)]
    assert all(0 < a < b for a, b in steps), steps
    assert float(mpes.delta.norm()) < float(full.delta.norm())


def test_weights_restored_when_a_step_raises(tiny_lm, tmp_path, monkeypatch):
    from kedit.editors import memit

    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    calls = {"n": 0}
    real = memit.MultiLayerEditor.solve

    def boom(self, lm, layer, K, R, state, stats, info, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("solver exploded")
        return real(self, lm, layer, K, R, state, stats, info, **kw)

    monkeypatch.setattr(memit.MultiLayerEditor, "solve", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        get_editor("memit", _hp("memit"), cache_dir=tmp_path).compute(tiny_lm, REQS, None, _stats(tiny_lm))
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.model.state_dict().items())


def test_bad_inputs_raise_clear_errors(tiny_lm, tmp_path):
    ed = get_editor("alphaedit", _hp("alphaedit"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="key statistics"):
        ed.compute(tiny_lm, REQS, None, None)
    with pytest.raises(ValueError, match="lack layers"):
        ed.compute(tiny_lm, REQS, None, {0: torch.eye(tiny_lm.adapter.key_dim())})
    with pytest.raises(ValueError, match="for 'memit'"):
        ed.compute(tiny_lm, REQS, EditorState("memit"), _stats(tiny_lm))
    with pytest.raises(ValueError, match="one layer"):
        get_editor("rome", _hp("rome", layers=[1, 2])).compute(tiny_lm, REQS, None, _stats(tiny_lm))
    with pytest.raises(ValueError, match="unknown edit method"):
        get_editor("nope")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        load_hparams("memit", overrides={"v_lrr": 1})


def test_hparams_files_load_for_every_model_and_method():
    for slug in ("smollm2-135m", "llama-3-8b", "gpt-j-6b", "gpt2-xl", None):
        for method in ("rome", "memit", "alphaedit"):
            hp = load_hparams(method, slug)
            assert hp.method == method and hp.source.endswith(".yaml") and len(hp.source_sha256) == 64
    assert load_hparams("rome", "smollm2-135m").layers == [6]
    assert load_hparams("memit", "llama-3-8b").mom2_update_weight == 15000
    assert EditHparams(layers="auto").resolve_layers(30) == [4, 5, 6, 7, 8, 9]


def test_context_prefixes_cached_on_disk(tiny_lm, tmp_path):
    from kedit.editors import context

    p1 = context.context_prefixes(tiny_lm, 2, 3, 0, tmp_path)
    assert p1[0] == "" and len(p1) == 3 and all("{" not in p and "}" not in p for p in p1)
    files = list((tmp_path / "contexts").glob("*.json"))
    assert len(files) == 1
    import json

    rec = json.loads(files[0].read_text())
    files[0].write_text(json.dumps({**rec, "prefixes": ["from disk. ", *rec["prefixes"][1:]]}))
    # no process-wide memo: a new call reads the file back (not regenerated, not remembered)
    assert context.context_prefixes(tiny_lm, 2, 3, 0, tmp_path)[1].startswith("from disk")
    memo: dict = {}
    assert context.context_prefixes(tiny_lm, 2, 3, 0, tmp_path, memo)[1].startswith("from disk")
    files[0].unlink()
    assert context.context_prefixes(tiny_lm, 2, 3, 0, tmp_path, memo)[1].startswith("from disk")  # the run's memo


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox", "gemma3_text"])
def test_prefix_cache_replay_matches_full_replay(family, tiny_tokenizer):
    from kedit.editors.prompts import shared_heads, subject_rows
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model(family), tiny_tokenizer, slug=f"tiny-{family}")
    rows = subject_rows(tiny_tokenizer, REQS, PREFIXES)
    assert max(shared_heads(rows.ids, rows.subj_pos)) >= 4  # the shared-prefix path is exercised
    hp = _hp("memit", v_steps=4, v_lr=0.05, clamp_norm_factor=100.0)
    cached = optimise_vstar(lm, REQS, PREFIXES, hp, 1)
    full = optimise_vstar(lm, REQS, PREFIXES, EditHparams(**{**hp.to_dict(), "v_prefix_cache": False}), 1)
    assert torch.allclose(cached.v0, full.v0, atol=1e-5)
    assert torch.allclose(cached.delta, full.delta, atol=1e-4, rtol=1e-3)
    for a, b in zip(cached.diagnostics, full.diagnostics):
        assert a.vstar_loss_start == pytest.approx(b.vstar_loss_start, rel=1e-5)
        assert a.vstar_loss_end == pytest.approx(b.vstar_loss_end, rel=1e-4)


def test_shared_heads_are_the_common_leading_tokens_of_a_group():
    from kedit.editors.prompts import shared_heads

    seqs = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 9, 9], [1, 2, 3, 4, 8], [7, 7, 7, 7, 7], [5, 5, 5, 5, 5, 5]]
    split = [6, 6, 3, 4, 5]
    # rows 0 and 1 share 5 tokens; row 2 starts the same but caches only 3 (< 4): alone; rows 3, 4 alone
    assert shared_heads(seqs, split) == [5, 5, 0, 0, 0]
    assert shared_heads(seqs, [6, 4, 6, 4, 5]) == [4, 4, 4, 0, 0]  # capped by the shortest cached part


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox", "gemma3_text"])
def test_subject_states_with_shared_heads_match_full_rows(family, tiny_tokenizer, monkeypatch):
    import kedit.editors.keys as keys_mod
    from kedit.editors.keys import SubjectStates
    from kedit.editors.prompts import subject_rows
    from kedit.editors.runner import SharedHeadSlice
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model(family), tiny_tokenizer, slug=f"tiny-{family}")
    rows = subject_rows(tiny_tokenizer, REQS, PREFIXES)
    shared = SubjectStates(lm, rows, 1, 2)
    monkeypatch.setattr(keys_mod, "shared_heads", lambda seqs, split: [0] * len(seqs))
    plain = SubjectStates(lm, rows, 1, 2)
    assert isinstance(shared.slice, SharedHeadSlice) and not isinstance(plain.slice, SharedHeadSlice)
    for per_row in (False, True):
        k1, z1 = shared.read(lm, [1, 2], per_row=per_row)
        k2, z2 = plain.read(lm, [1, 2], per_row=per_row)
        assert torch.allclose(z1, z2, atol=1e-5) and all(torch.allclose(k1[i], k2[i], atol=1e-5) for i in (1, 2))
    with torch.no_grad():  # after a weight change, a read from the changed layer still agrees
        lm.adapter.mlp_out(1).weight.mul_(1.5)
    for st in (shared, plain):
        st.read(lm, [1, 2])
    k1, z1 = shared.read(lm, [2], begin=2)
    k2, z2 = plain.read(lm, [2], begin=2)
    assert torch.allclose(z1, z2, atol=1e-5) and torch.allclose(k1[2], k2[2], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox", "gemma3_text"])
def test_block_replay_reproduces_the_model_logits(family, tiny_tokenizer):
    from kedit.editors.runner import capture_blocks, unembed_states
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model(family), tiny_tokenizer, slug=f"tiny-{family}")
    ids = torch.tensor([tiny_tokenizer("The Eiffel Tower is in Paris").input_ids[:6],
                        tiny_tokenizer("Rome is the capital of Italy").input_ids[:6]])
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        sl = capture_blocks(lm, ids, 2, lm.adapter.num_layers)
        h = sl.run(lm)
        rows = torch.arange(2).repeat_interleave(ids.shape[1])
        cols = torch.arange(ids.shape[1]).repeat(2)
        got = unembed_states(lm, h[rows, cols]).view(2, ids.shape[1], -1)
        sub = sl.run(lm, sl.hidden[1:], rows=torch.tensor([1]))
    assert torch.allclose(got, ref, atol=1e-4)
    assert torch.allclose(sub, h[1:], atol=1e-5)


def test_hparam_overrides_are_coerced_to_numbers():
    hp = load_hparams("alphaedit", "smollm2-135m", overrides={"nullspace_threshold": "1e9", "L2": 5, "v_steps": 7.0})
    assert hp.nullspace_threshold == 1e9 and isinstance(hp.L2, float) and hp.v_steps == 7
    with pytest.raises(ValueError, match="L2 must be a number"):
        load_hparams("alphaedit", "smollm2-135m", overrides={"L2": "big"})
    with pytest.raises(ValueError, match="v_stop must be nll or most_probable"):
        load_hparams("alphaedit", "smollm2-135m", overrides={"v_stop": "sometimes"})
    with pytest.raises(ValueError, match=r"hparams \(inline\): key_mode must be average or contexts"):
        EditHparams(key_mode="bogus")  # built directly, not loaded: checked all the same


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_bfloat16_vstar_tracks_float32_and_its_delta_works_in_float32(family, tiny_tokenizer):
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model(family), tiny_tokenizer, slug=f"tiny-{family}")
    reqs = [EditRequest("A photo of {}", "The Eiffel Tower", "capital", id="a"),
            EditRequest("We talked about {}", "Danielle Darrieux", "the", id="b")]
    hp = _hp("memit", v_steps=30, v_lr=0.1, v_stop="most_probable", v_stop_nll=1e-3, clamp_norm_factor=100.0,
             v_weight_decay=0.0)
    f32 = optimise_vstar(lm, reqs, PREFIXES, hp, 1)
    bf16 = optimise_vstar(lm, reqs, PREFIXES, EditHparams(**{**hp.to_dict(), "v_dtype": "bfloat16"}), 1)
    assert torch.equal(bf16.v0, f32.v0)  # v₀ comes from the float32 prefix pass either way
    assert (f32.dtype, bf16.dtype) == ("float32", "bfloat16")
    auto = optimise_vstar(lm, reqs, PREFIXES, EditHparams(**{**hp.to_dict(), "v_dtype": "auto"}), 1)
    from kedit.editors.precision import resolve_v_dtype

    assert auto.dtype == resolve_v_dtype("auto", "cpu")  # bfloat16 only on a CPU with bfloat16 units
    assert torch.equal(auto.delta, (bf16 if auto.dtype == "bfloat16" else f32).delta)
    assert bf16.delta.dtype == torch.float32
    for a, b in zip(bf16.diagnostics, f32.diagnostics):
        assert a.constraint_met and a.vstar_loss_start == pytest.approx(b.vstar_loss_start, rel=0.05)
    # found with bfloat16 matmuls, each δ still makes its targets the top predictions in float32
    assert _top_tokens_hit(lm, reqs, bf16, 1) == [True] * len(reqs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert not ALL_ATTENTION_FUNCTIONS._local_mapping  # the float32 attention override is gone again
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    with pytest.raises(ValueError, match="v_dtype"):
        EditHparams(v_dtype="float16")


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "broadcast"])
def test_packed_gqa_attention_equals_repeat_kv_sdpa(mask_kind):
    from transformers.integrations.sdpa_attention import repeat_kv

    from kedit.editors.runner import packed_gqa_sdpa

    g = torch.Generator().manual_seed(0)
    b, h, kv, q, k, d = 4, 6, 2, 3, 7, 8
    query, key, value = (torch.randn(b, n, t, d, generator=g) for n, t in ((h, q), (kv, k), (kv, k)))
    allowed = torch.ones(q, k, dtype=torch.bool).tril(k - q)  # a suffix after a cached prefix
    allowed = allowed.expand(1 if mask_kind == "broadcast" else b, 1, q, k).clone()
    allowed[0, 0, 1, 0] = False  # one row masks a prefix token: the mask is per row, not a plain causal one
    mask = allowed if mask_kind != "additive" else torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, h // kv), repeat_kv(value, h // kv), attn_mask=mask, scale=0.3).transpose(1, 2)
    got = packed_gqa_sdpa(query, key, value, mask, scaling=0.3)
    assert got.shape == (b, q, h, d) and torch.allclose(got, ref, atol=1e-6)
    with pytest.raises(ValueError, match="packed GQA"):
        packed_gqa_sdpa(query, key[:, :1].expand(b, 4, k, d), value, mask)


def test_vstar_replay_attention_packs_gqa_and_matches_the_model_kernel(tiny_tokenizer, monkeypatch):
    """The tiny llama has 4 query heads over 2 kv heads: v*'s replay takes the packed path, and the
    optimised δ is the one transformers' own SDPA kernel gives."""
    from kedit.editors import runner
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model("llama"), tiny_tokenizer, slug="tiny-llama")
    assert lm.model.config._attn_implementation == "sdpa"
    reqs = [EditRequest("A photo of {}", "The Eiffel Tower", "capital", id="a"),
            EditRequest("We talked about {}", "Danielle Darrieux", "the", id="b")]
    hp = _hp("memit", v_steps=6, v_stop_nll=1e-6)
    calls = {"packed": 0}
    packed = runner.packed_gqa_sdpa

    def counting(*a, **kw):
        calls["packed"] += 1
        return packed(*a, **kw)

    monkeypatch.setattr(runner, "packed_gqa_sdpa", counting)
    fast = optimise_vstar(lm, reqs, PREFIXES, hp, 1)
    assert calls["packed"] > 0
    monkeypatch.setattr(runner, "_packable", lambda *a: False)
    plain = optimise_vstar(lm, reqs, PREFIXES, hp, 1)
    assert torch.allclose(fast.delta, plain.delta, rtol=1e-4, atol=1e-5)
    assert [d.vstar_steps for d in fast.diagnostics] == [d.vstar_steps for d in plain.diagnostics]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_vstar_taps_are_the_module_inputs_a_direct_forward_gives(tiny_lm, prefix_cache):
    """v*'s first pass hands back an MLP's input at every context's subject (memoir's fingerprints read
    it there instead of running the model again): the same as a plain forward of each prompt."""
    from kedit.hooks import Trace

    reqs = [EditRequest("A photo of {}", "The Eiffel Tower", "capital", id="a"),
            EditRequest("We talked about {} today", "Danielle Darrieux", "the", id="b")]
    name = tiny_lm.adapter.mlp_out_name(1)
    vs = optimise_vstar(tiny_lm, reqs, PREFIXES, _hp("memit", v_steps=1, v_prefix_cache=prefix_cache), 1,
                        taps=[name])
    rows = subject_rows(tiny_lm.tokenizer, reqs, PREFIXES)
    x = vs.taps[name]
    assert x.shape == (2, len(PREFIXES), tiny_lm.model.config.intermediate_size) and x.dtype == torch.float32
    for i, (ids, pos, q) in enumerate(zip(rows.ids, rows.subj_pos, rows.req)):
        with torch.no_grad(), Trace(tiny_lm.model, [name], retain_input=True) as tr:
            tiny_lm.model(input_ids=torch.tensor([ids]))
        assert torch.allclose(x[q, i % len(PREFIXES)], tr.inputs[name][0, pos], atol=1e-5)
        # and at the token before the subject's (from the prefix cache's pass, or the replayed rows)
        assert torch.allclose(vs.taps_before[name][q, i % len(PREFIXES)], tr.inputs[name][0, pos - 1], atol=1e-5)
    with pytest.raises(ValueError, match="did not run below block"):
        optimise_vstar(tiny_lm, reqs, PREFIXES, _hp("memit", v_steps=1), 1, taps=[tiny_lm.adapter.mlp_out_name(2)])


def test_matmul_weights_in_swaps_copies_and_restores_the_same_parameters(tiny_lm):
    from kedit.editors.runner import matmul_weights_in

    head, block = tiny_lm.adapter.unembed, tiny_lm.adapter.module(tiny_lm.adapter.layer_name(1))
    before = {n: p for n, p in tiny_lm.model.named_parameters()}
    values = {n: p.detach().clone() for n, p in before.items()}
    with matmul_weights_in([block, head], torch.bfloat16):
        inside = dict(tiny_lm.model.named_parameters(remove_duplicate=False))
        mats = [n for n in inside if n.startswith(tiny_lm.adapter.layer_name(1) + ".") and inside[n].dim() == 2]
        assert mats and all(inside[n].dtype == torch.bfloat16 for n in mats)
        assert all(p.dtype == torch.float32 for n, p in inside.items() if p.dim() == 1)
        assert tiny_lm.adapter.module(tiny_lm.adapter.layer_name(0)).mlp.down_proj.weight.dtype == torch.float32
    after = dict(tiny_lm.model.named_parameters())
    assert all(after[n] is before[n] and torch.equal(after[n], values[n]) for n in before)


def test_length_groups_merge_the_next_length_while_its_padding_fits_the_budget():
    from kedit.editors.vstar import length_groups

    seqs = [[0] * n for n in (5, 7, 6, 9, 5, 14)]
    split = [0] * len(seqs)
    assert length_groups(seqs, split) == [[0, 4], [2], [1], [3], [5]]  # one group per length
    # 6 joins 5 (2 rows x 1 pad), 7 joins them (3 x 1), 9 does not (4 x 2 = 8 > 4), 14 not (1 x 5)
    assert length_groups(seqs, split, 4) == [[0, 4, 2, 1], [3], [5]]
    assert length_groups(seqs, split, 8) == [[0, 4, 2, 1, 3], [5]]
    assert length_groups(seqs, split, 25) == [[0, 4, 2, 1, 3, 5]]  # 5 rows x 5 pads
    assert length_groups(seqs, split, 1) == [[0, 4], [2, 1], [3], [5]]  # 6 not (2 x 1 > 1), 7 joins 6
    assert sorted(r for g in length_groups(seqs, split, 3) for r in g) == list(range(len(seqs)))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_padded_replay_groups_give_the_same_vstar(family, prefix_cache, tiny_tokenizer):
    """Right pads never reach a real position under causal attention: one padded group per batch
    optimises the same δ as one group per suffix length."""
    from kedit.editors.vstar import length_groups
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    lm = wrap_model(make_tiny_model(family), tiny_tokenizer, slug=f"tiny-{family}")
    hp = _hp("memit", v_steps=4, v_lr=0.05, clamp_norm_factor=100.0, kl_factor=1.0, v_prefix_cache=prefix_cache)
    exact = optimise_vstar(lm, REQS, PREFIXES, hp, 1)
    padded = optimise_vstar(lm, REQS, PREFIXES, EditHparams(**{**hp.to_dict(), "v_replay_merge_tokens": 10_000}), 1)
    rows = subject_rows(tiny_tokenizer, REQS, PREFIXES)
    split = rows.subj_pos if prefix_cache else [0] * len(rows.ids)
    assert len(length_groups(rows.ids, split)) > 1  # there were groups to merge
    assert torch.allclose(exact.v0, padded.v0, atol=1e-5)
    assert torch.allclose(exact.delta, padded.delta, atol=1e-4, rtol=1e-3)
    for a, b in zip(exact.diagnostics, padded.diagnostics):
        assert a.vstar_loss_end == pytest.approx(b.vstar_loss_end, rel=1e-4)
        assert a.vstar_steps == b.vstar_steps


def test_vstar_step_reads_the_device_back_once_not_per_group_or_request(tiny_lm):
    """The Adam loop decides which requests are still running on the host: a step costs one
    read-back whatever the number of replay groups and finished requests (on a GPU each read-back
    waits for every queued kernel)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    data_dependent = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in data_dependent
            return func(*args, **(kwargs or {}))

    def reads(steps: int) -> int:
        hp = _hp("memit", v_steps=steps, v_stop_nll=-1.0)  # never met: every request runs every step
        with Count() as c:
            optimise_vstar(tiny_lm, REQS, PREFIXES, hp, 2)
        return c.n

    from kedit.editors.vstar import length_groups

    rows = subject_rows(tiny_lm.tokenizer, REQS, PREFIXES)
    assert len(length_groups(rows.ids, rows.subj_pos)) >= 2  # several groups per step
    assert reads(6) - reads(2) <= 4 * 2  # one per step (is any request left?), with room for one more


def test_vstar_refuses_rows_longer_than_a_sliding_window(tiny_tokenizer):
    """Gemma's local layers: a prefixed prompt longer than the window is refused with the reason (the
    prefix cache's slots are not positions, so the window would cut at the wrong tokens)."""
    from kedit.models.store import wrap_model
    from tests.conftest import make_tiny_model

    model = make_tiny_model("gemma3_text")
    model.config.sliding_window = 4
    lm = wrap_model(model, tiny_tokenizer, slug="tiny-gemma3")
    with pytest.raises(ValueError, match=r"more than the model's sliding window \(4\)"):
        optimise_vstar(lm, REQS, PREFIXES, _hp("memit", v_steps=1), 1)
