"""T-Patcher on a tiny random Llama: margins hold, detaching restores the base model bit for bit,
attach is idempotent, batched training equals one-at-a-time, the state survives save/load exactly."""

from __future__ import annotations

import pytest
import torch

from kedit.editors import attach as A
from kedit.editors import tpatcher as T
from kedit.editors.base import EditRequest
from kedit.editors.hparams import EditHparams

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patches_fire_on_their_edit_and_stay_silent_on_the_memory_set(tiny_lm, tmp_path, tpatcher):
    res = tpatcher.compute(tiny_lm, tmp_path)
    st = res.state
    p = T.patches_of(st)
    assert res.deltas == {} and p.n == 3 and st.meta["patch_facts"] == ["eiffel", "darrieux", "yasuda"]
    # own inputs (stored per patch): pre-activation >= the activation margin
    z_own = T.patch_preactivation(st.tensors[T.EDIT_X], p.key, p.bias)
    own = z_own[torch.arange(z_own.shape[0]), st.tensors[T.EDIT_OWNER]]
    assert (own >= st.meta["act_margin"] - 1e-5).all()
    # memory set, recomputed directly: canaries, the neighbourhood prompts, the other facts' inputs
    layer = st.meta["layer"]
    mem = torch.cat([T.general_memory(tiny_lm, layer, "", 0), T.mlp_inputs(tiny_lm, layer,
                                                                           tpatcher.reqs[0].neighbors)])
    assert (T.patch_preactivation(mem, p.key, p.bias) <= -st.meta["memory_margin"] + 1e-5).all()
    others = z_own[st.tensors[T.EDIT_OWNER][:, None] != torch.arange(3)[None]]
    assert (others <= -st.meta["memory_margin"] + 1e-5).all()
    # and the edit took: the new target's probability rose on the bare prompt
    from kedit.evaluation.metrics import target_logprobs

    before = target_logprobs(tiny_lm, [r.text for r in tpatcher.reqs], [r.target_new for r in tpatcher.reqs])
    h = T.attach(tiny_lm, st)
    after = target_logprobs(tiny_lm, [r.text for r in tpatcher.reqs], [r.target_new for r in tpatcher.reqs])
    h.remove()
    assert (after > before + 1.0).all()


def test_detach_and_dropping_patches_restore_the_base_output_bit_for_bit(tiny_lm, tmp_path, tpatcher):
    base = tpatcher.logits(tiny_lm)
    st = tpatcher.compute(tiny_lm, tmp_path).state
    h = T.attach(tiny_lm, st)
    edited = tpatcher.logits(tiny_lm)
    assert not torch.equal(edited[0], base[0])
    with A.suspended(tiny_lm.model, T.METHOD):  # what compute does while it reads the base model
        assert torch.equal(tpatcher.logits(tiny_lm), base)
    assert torch.equal(tpatcher.logits(tiny_lm), edited) and h.active
    h.remove()
    assert torch.equal(tpatcher.logits(tiny_lm), base) and A.attached(tiny_lm.model, T.METHOD) is None
    # dropping every fact's patch leaves nothing to attach; dropping one keeps the others' rows
    assert T.attach(tiny_lm, T.without_facts(st, ["eiffel", "darrieux", "yasuda"])) is None
    assert torch.equal(tpatcher.logits(tiny_lm), base)
    one = T.without_facts(st, ["darrieux"])
    assert one.meta["patch_facts"] == ["eiffel", "yasuda"]
    assert torch.equal(one.tensors[T.KEY], st.tensors[T.KEY][[0, 2]])
    assert sorted(set(one.tensors[T.EDIT_OWNER].tolist())) == [0, 1]
    with pytest.raises(KeyError, match="nobody"):
        T.without_facts(st, ["nobody"])


def test_attach_is_idempotent(tiny_lm, tmp_path, tpatcher):
    st = tpatcher.compute(tiny_lm, tmp_path, reqs=tpatcher.reqs[:1]).state
    mlp = tiny_lm.adapter.module(tiny_lm.adapter.mlp_name(st.meta["layer"]))
    n_hooks = len(mlp._forward_hooks)
    T.attach(tiny_lm, st)
    once = tpatcher.logits(tiny_lm)
    h = T.attach(tiny_lm, st)
    assert torch.equal(tpatcher.logits(tiny_lm), once) and len(mlp._forward_hooks) == n_hooks + 1
    h.remove()
    assert len(mlp._forward_hooks) == n_hooks


def test_batched_training_equals_one_at_a_time(tiny_lm, tmp_path, tpatcher):
    """Each patch's loss reads only its own parameters, and a trained patch is silent (ReLU: exactly
    zero) on every position of the other facts' rows, which are in its memory set. So, with the same
    memory set, a patch's loss and gradient in the batch are the ones it has alone (float tolerance:
    the rows run in differently padded batches), the others get no gradient from it, and training the
    batch reaches what training each patch alone reaches. The trained parameters are compared by
    their outcome, not element by element: Adam divides every gradient element by its own scale, so
    float noise in an element whose gradient is ~0 becomes a step of the learning rate's size, and
    how that noise falls differs between CPUs (AVX2 and AVX-512 kernels sum in other orders)."""
    from kedit.editors.context import context_prefixes

    hp = tpatcher.hp()
    layer = hp.layers[0]
    prefixes = context_prefixes(tiny_lm, hp.n_prefixes, hp.prefix_len, hp.prefix_seed, tmp_path)
    general = T.general_memory(tiny_lm, layer, "", 0)
    d_out = tiny_lm.adapter.out_dim(layer)
    batch = T.build_problem(tiny_lm, tpatcher.reqs, prefixes, layer, None, None, general)
    together, info_together = T.train_patches(tiny_lm, batch, T.init_patches(batch, d_out, hp), hp)

    def loss_and_grads(prob, patches, row):
        params = [t.detach().clone().requires_grad_(True) for t in (patches.key, patches.bias, patches.value)]
        loss = T.patch_losses(tiny_lm, prob, T.Patches(*params), hp).total[row]
        loss.backward()
        return loss.detach(), [q.grad for q in params]

    for r in range(len(tpatcher.reqs)):
        solo = T.build_problem(tiny_lm, [tpatcher.reqs[r]], prefixes, layer, None, None, general)
        solo.neg_x = batch.neg_x  # the same memory set: the batch's, with this patch's own rows as its own
        solo.neg_owner = torch.where(batch.neg_owner == r, 0, -1)
        mine = T.Patches(together.key[r: r + 1], together.bias[r: r + 1], together.value[r: r + 1])
        loss_all, grads_all = loss_and_grads(batch, together, r)
        loss_one, grads_one = loss_and_grads(solo, mine, 0)
        torch.testing.assert_close(loss_one, loss_all, atol=1e-5, rtol=1e-5)
        others = [i for i in range(len(tpatcher.reqs)) if i != r]
        for g_one, g_all in zip(grads_one, grads_all):
            torch.testing.assert_close(g_one[0], g_all[r], atol=1e-5, rtol=1e-4)
            assert float(g_all[others].abs().max()) == 0.0  # patch r's loss reads no other patch
        alone, info_alone = T.train_patches(tiny_lm, solo, T.init_patches(solo, d_out, hp), hp)
        for key in ("nll_start", "loss_start"):
            assert info_alone[0][key] == pytest.approx(info_together[r][key], abs=1e-4)
        assert info_alone[0]["nll_end"] == pytest.approx(info_together[r]["nll_end"], abs=0.01)
        assert info_alone[0]["steps"] == info_together[r]["steps"]
    assert not torch.allclose(together.value[0], together.value[1])


def test_state_save_load_is_bit_exact_and_later_batches_keep_earlier_patches(tiny_lm, tmp_path, tpatcher):
    from kedit.editors.io import load_state, save_edit

    first = tpatcher.compute(tiny_lm, tmp_path, reqs=tpatcher.reqs[:2])
    save_edit(tmp_path / "e1", first)
    loaded = load_state(tmp_path / "e1")
    assert loaded.meta == first.state.meta and loaded.tensors.keys() == first.state.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], v) for k, v in first.state.tensors.items())
    T.attach(tiny_lm, first.state)
    want = tpatcher.logits(tiny_lm)
    T.attach(tiny_lm, loaded)
    assert torch.equal(tpatcher.logits(tiny_lm), want)
    # the next batch runs on the attached model: earlier patches are frozen and kept row for row
    second = tpatcher.compute(tiny_lm, tmp_path, reqs=tpatcher.reqs[2:], state=loaded)
    for k in (T.KEY, T.BIAS, T.VALUE):
        assert torch.equal(second.state.tensors[k][:2], first.state.tensors[k])
    assert second.state.meta["patch_facts"] == ["eiffel", "darrieux", "yasuda"]
    assert second.state.meta["n_batches"] == 2
    A.detach(tiny_lm.model, T.METHOD)


def test_hparams_checks_and_late_layer():
    assert EditHparams(method="tpatcher", layers="late").resolve_layers(30) == [24]
    assert EditHparams(method="tpatcher", layers="late").resolve_layers(4) == [2]
    with pytest.raises(ValueError, match="tp_lr must be positive"):
        EditHparams(method="tpatcher", tp_lr=0)
    with pytest.raises(ValueError, match="tp_memory_tokens"):
        EditHparams(method="tpatcher", tp_memory_tokens=-1)


def test_patch_output_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x, k, b, v = (torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, generator=g),
                  torch.randn(3, 6, generator=g))
    want = torch.zeros(5, 6)
    for i in range(5):
        for p in range(3):
            want[i] += max(0.0, float(x[i] @ k[p] + b[p])) * v[p]
    torch.testing.assert_close(T.patch_output(x, k, b, v), want)


def test_lineage_restore_attaches_the_patches(tiny_lm, tiny_tokenizer, tmp_path, tpatcher,
                                              tiny_model_factory):
    """A committed T-Patcher state comes back on a freshly loaded model with its patches attached;
    going back to the base state takes them off."""
    from kedit.lineage import LineageStore
    from kedit.models.store import wrap_model

    base = tpatcher.logits(tiny_lm)
    res = tpatcher.compute(tiny_lm, tmp_path, reqs=tpatcher.reqs[:2])
    store = LineageStore(tmp_path / "lineage")
    s = store.commit(tiny_lm, res, None, {"file_sha256": "f0", "row_ids": ["eiffel", "darrieux"]}, {})
    T.attach(tiny_lm, res.state)
    want = tpatcher.logits(tiny_lm)
    A.detach(tiny_lm.model, T.METHOD)
    fresh = wrap_model(tiny_model_factory("llama"), tiny_tokenizer, slug="tiny-llama")
    st = store.materialise(s.id, fresh)
    assert st.meta["patch_facts"] == ["eiffel", "darrieux"]
    assert torch.equal(st.tensors[T.VALUE], res.state.tensors[T.VALUE])
    assert torch.equal(tpatcher.logits(fresh), want)
    assert store.materialise(None, fresh) is None
    assert torch.equal(tpatcher.logits(fresh), base) and A.attached(fresh.model, T.METHOD) is None


def test_lifelong_bench_runs_tpatcher_with_its_patches_attached(tiny_lm, workspace, tmp_path, monkeypatch,
                                                                counterfact_records, tiny_text):
    """The benchmark attaches each batch's state, so it measures the patched model."""
    import json

    import kedit.stats.corpus as corpus
    from kedit.bench.lifelong import LifelongConfig, run_lifelong
    from kedit.editors.io import load_state

    monkeypatch.setattr(corpus, "heldout_text", lambda *a, **k: " ".join(tiny_text * 5))
    (tmp_path / "cf.json").write_text(json.dumps(counterfact_records))
    cfg = LifelongConfig(method="tpatcher", data=str(tmp_path / "cf.json"), edits=3, batch=2, fluency_prompts=2,
                         fluency_tokens=8, ppl_tokens=200,
                         overrides={"layers": [2], "n_prefixes": 1, "prefix_len": 3, "tp_steps": 5,
                                    "tp_memory_corpus": ""})
    res = run_lifelong(tiny_lm, workspace, cfg, progress=False, edit_out=tmp_path / "edit")
    att = A.attached(tiny_lm.model, T.METHOD)
    assert att is not None
    assert res["edited"]["efficacy_magnitude"] != res["baseline"]["efficacy_magnitude"]
    state = load_state(tmp_path / "edit")
    assert state.meta["patch_facts"] == ["1", "2", "3"] and state.tensors[T.KEY].shape[0] == 3
    att.remove()


@pytest.mark.slow
def test_real_model_three_edits_flip_and_canaries_keep_their_answers(smollm, tmp_path, real_edits):
    """SmolLM2-135M: three T-Patcher edits flip their prompts; the shipped canary prompts' greedy
    answers do not change; detaching gives the base model back."""
    from kedit.editors.hparams import load_hparams
    from kedit.editors.registry import get_editor
    from kedit.evaluation.canary import shipped_prompts
    from kedit.evaluation.metrics import greedy_tokens, next_token_logprobs, target_logprobs

    lm = smollm
    reqs = [EditRequest(r["prompt"].replace(r["subject"], "{}"), r["subject"], r["target_new"], r["ground_truth"],
                        id=r["subject"]) for r in real_edits]
    prompts = [r["prompt"] for r in real_edits]

    def wins():
        new = target_logprobs(lm, prompts, [r["target_new"] for r in real_edits])
        old = target_logprobs(lm, prompts, [r["ground_truth"] for r in real_edits])
        return (new > old).tolist()

    canaries = shipped_prompts()
    before = greedy_tokens(lm, canaries, k=1)
    base_lp = next_token_logprobs(lm, prompts)
    assert not any(wins())
    hp = load_hparams("tpatcher", lm, overrides={"n_prefixes": 3, "tp_memory_tokens": 2048})
    res = get_editor("tpatcher", hp, cache_dir=tmp_path).compute(lm, reqs, None, None)
    h = T.attach(lm, res.state)
    try:
        assert all(wins())
        assert torch.equal(greedy_tokens(lm, canaries, k=1), before)
    finally:
        h.remove()
    assert torch.equal(next_token_logprobs(lm, prompts), base_lp)
