"""Sparse residual memory (editors/memoir/) on a tiny random Llama: exact base output where nothing
matches, edits that take, batched == one-at-a-time, bit-exact state round trip, idempotent attach,
exact retraction of one fact."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(lm, text):
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def _wins(lm, d):
    """The edit took: the greedy next token is the new target's first token (a random tiny model's
    logits are too flat to make a whole multi-token target likely)."""
    ids = lm.tokenizer(d["prompt"].format(d["subject"]), return_tensors="pt").input_ids
    first = lm.tokenizer(" " + d["target_new"], add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        return int(lm.model(input_ids=ids).logits[0, -1].argmax()) == first


def test_pure_functions_match_direct_computation():
    from kedit.editors.memoir import fingerprint, one_hot_sets, overlaps, residual_matrix

    g = torch.Generator().manual_seed(0)
    d, k = 40, 6
    x, bg, perm = torch.randn(5, d, generator=g), torch.randn(d, generator=g), torch.randperm(d, generator=g)
    fp = fingerprint(x, bg, perm, k)
    for row, got in zip(x, fp):
        want = sorted(perm[i].item() for i in sorted(range(d), key=lambda j: -(row[j] - bg[j]).item())[:k])
        assert got.tolist() == want
    stored = fp[[0, 2]]
    ov = overlaps(fp, one_hot_sets(stored, d))
    for i in range(5):
        for j in range(2):
            assert round(ov[i, j].item() * k) == len(set(fp[i].tolist()) & set(stored[j].tolist()))
    u, v = torch.randn(2, 3, 2, generator=g), torch.randn(2, 2, k, generator=g)
    blocks = u @ v
    w = residual_matrix(stored, u, v, d)
    want = torch.zeros(3, d)
    for e in range(2):
        for c in range(k):
            want[:, stored[e, c]] += blocks[e, :, c]
    assert torch.allclose(w, want)
    # grown entry by entry (in small chunks) it is the same matrix, bit for bit
    grown = residual_matrix(stored[:1], u[:1], v[:1], d)
    assert torch.equal(residual_matrix(stored[1:], u[1:], v[1:], d, start=grown), residual_matrix(stored, u, v, d, chunk=1))


def test_exact_keys_fire_their_entry_strictly_and_win_over_masks():
    """``read_memory``: a token whose exact-key overlap reaches the exact threshold reads that entry even
    when its mask overlap is below ``threshold`` or another entry's mask overlaps it more; below both
    thresholds nothing fires."""
    from kedit.editors.memoir import fingerprint, one_hot_sets, read_memory

    g = torch.Generator().manual_seed(4)
    d, k = 64, 8
    x, bg, perm = torch.randn(4, d, generator=g), torch.zeros(d), torch.arange(d)
    fp = fingerprint(x, bg, perm, k)
    masks = torch.stack([fp[1], torch.tensor([c for c in range(d) if c not in fp[0]][:k])])  # entry 0: x1's set
    exact = torch.stack([fp[3], fp[0]])  # entry 1's exact key is x0's own set
    rd = read_memory(x, bg, perm, one_hot_sets(masks, d), k, 0.5)
    assert rd.tokens.tolist() == [1] and rd.entry.tolist() == [0]  # masks only: x1 reads entry 0
    rd = read_memory(x, bg, perm, one_hot_sets(masks, d), k, 0.5, one_hot_sets(exact, d), 1.0)
    assert rd.tokens.tolist() == [0, 1, 3] and rd.entry.tolist() == [1, 0, 0]
    # x0 overlaps entry 1's mask not at all, yet its exact key fires entry 1; x2 matches nothing
    rd = read_memory(x[[2]], bg, perm, one_hot_sets(masks, d), k, 0.5, one_hot_sets(exact, d), 1.0)
    assert rd.tokens.numel() == 0
    ov = len(set(fp[1].tolist()) & set(fp[3].tolist())) / k  # x1 also reads x3's exact key at this overlap
    rd = read_memory(x[[1]], bg, perm, one_hot_sets(masks, d), k, 0.5, one_hot_sets(exact[:1], d), 1.0)
    assert rd.entry.tolist() == [0] and ov < 1.0


def test_span_keys_let_a_token_read_a_guarded_entry_only_after_the_right_token():
    """``read_memory`` with span keys: a guarded entry counts only where the token before overlaps its
    span key (none at the start of a text); the best entry is taken among those a token may read;
    unguarded entries and exact keys are not affected. ``previous_tokens`` shifts within each row and
    takes position 0's from the continued call."""
    from kedit.editors.memoir import SpanGuard, fingerprint, one_hot_sets, previous_tokens, read_memory

    g = torch.Generator().manual_seed(5)
    d, k = 64, 8
    x, bg, perm = torch.randn(1, 4, d, generator=g), torch.zeros(d), torch.arange(d)
    carry = torch.randn(1, d, generator=g)
    prev, has = previous_tokens(x, None)
    assert torch.equal(prev[1:], x[0, :-1]) and has.tolist() == [False, True, True, True]
    prev_c, has_c = previous_tokens(x, carry)
    assert torch.equal(prev_c[0], carry[0]) and torch.equal(prev_c[1:], x[0, :-1]) and bool(has_c.all())
    flat = x[0]
    fp = fingerprint(flat, bg, perm, k)
    other = torch.tensor([c for c in range(d) if c not in fp[3] and c not in fp[1]][:k])
    half = torch.cat([fp[3][: k // 2 + 2], other[: k // 2 - 2]]).sort().values  # overlaps x3 by 0.75
    masks = one_hot_sets(torch.stack([fp[3], half, fp[0]]), d)  # entry 0: x3 exactly; entry 1: x3 at 0.75
    spans = one_hot_sets(torch.stack([fp[1], fp[2], other]), d)

    def read(guarded, prev=prev, has=has, exact=None):
        span = SpanGuard(prev, has, spans, torch.tensor(guarded), 1.0)
        return read_memory(flat, bg, perm, masks, k, 0.7, exact, 1.0, span)

    rd = read([False, False, False])  # nothing guarded: x3 reads entry 0, x0 entry 2
    assert rd.tokens.tolist() == [0, 3] and rd.entry.tolist() == [2, 0]
    rd = read([True, False, False])  # entry 0 wants x1 before, x3 has x2: it reads entry 1 instead
    assert rd.tokens.tolist() == [0, 3] and rd.entry.tolist() == [2, 1]
    rd = read([True, True, False])  # entry 1 wants x2 before: x3 reads it
    assert rd.entry.tolist() == [2, 1]
    rd = read([True, True, True])  # entry 2 guarded: x0 is the first token and reads nothing
    assert rd.tokens.tolist() == [3] and rd.entry.tolist() == [1]
    rd = read([True, True, True], prev_c, has_c)  # after a continued call, x0's token before is `carry`
    assert rd.tokens.tolist() == [3]
    rd = read([True, True, True], exact=one_hot_sets(fp[[0]], d))  # exact keys are not guarded
    assert rd.tokens.tolist() == [0, 3] and rd.entry.tolist() == [0, 1]


def test_span_keys_are_the_token_before_the_subject_and_cached_decoding_decides_as_the_full_forward(
        tiny_lm, memoir):
    """A subject of several tokens gets a span key (the fingerprint before its last token), one of one
    token none; with the memory attached, a KV-cache step onto the subject's last token reads the entry
    as the full forward does, and the same token without its context reads nothing."""
    from kedit.editors.memoir import EXACT, SPAN, SPAN_ON, attach, fingerprint
    from kedit.editors.prompts import subject_rows
    from kedit.editors.runner import cache_kwargs
    from kedit.hooks import Trace

    lm = tiny_lm
    text = memoir.b["prompt"].format(memoir.b["subject"])
    rows = subject_rows(lm.tokenizer, [memoir.req(memoir.b), memoir.req(memoir.a)], [""])
    assert rows.subj_first[0] < rows.subj_pos[0]  # "Danielle Darrieux" spans several tokens
    res = memoir.editor(memoir.hp(mm_threshold=0.5)).compute(lm,
                                                             [memoir.req(memoir.b),
                                                              memoir.req(memoir.a)], None, None)
    st = res.state
    single = rows.subj_first[1] == rows.subj_pos[1]
    assert st.tensors[SPAN_ON].tolist() == [True, not single]
    name = lm.adapter.mlp_out_name(st.meta["layer"])
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
        lm.model(input_ids=ids)
    want = fingerprint(tr.inputs[name][0, rows.subj_pos[0] - 1], st.tensors["mm.bg_mean"], st.tensors["mm.perm"],
                       st.meta["k"])
    assert torch.equal(st.tensors[SPAN][0], want)  # no prefixes: the bare prompt's token before the last
    # written from v*'s first pass (above) or by running those tokens again: the same keys
    from kedit.editors.memoir import span_keys
    again = span_keys(lm, [memoir.req(memoir.b), memoir.req(memoir.a)], [""], st, st.meta["layer"],
                      st.meta["k"])
    assert torch.equal(again[0][st.tensors[SPAN_ON]], st.tensors[SPAN][st.tensors[SPAN_ON]])
    del st.tensors[EXACT], st.meta["exact_threshold"]  # the mask (and its span key) must carry the read
    assert memoir.fires(lm, st, text).tokens.tolist() == [ids.shape[1] - 1]
    with torch.no_grad():
        base_last = lm.model(input_ids=ids[:, -1:]).logits[0, -1]
        attach(lm, st)
        full = lm.model(input_ids=ids).logits[0, -1]
        out = lm.model(input_ids=ids[:, :-1], use_cache=True)
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        step = lm.model(input_ids=ids[:, -1:], **cache_kwargs(lm, cache), use_cache=True).logits[0, -1]
        alone = lm.model(input_ids=ids[:, -1:]).logits[0, -1]  # no token before: the guarded entry stays shut
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(alone, base_last)
    gen = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert int(gen[0, ids.shape[1]]) == int(full.argmax())
    st.tensors[SPAN][0] = torch.tensor([c for c in range(lm.adapter.key_dim()) if c not in want][: st.meta["k"]])
    assert memoir.fires(lm, st, text).tokens.numel() == 0


def test_closed_form_block_fits_every_context_and_matches_the_normal_equations():
    from kedit.editors.memoir import closed_form_blocks

    g = torch.Generator().manual_seed(1)
    n, ctx, k, d_out = 3, 4, 9, 5
    x = torch.randn(n, ctx, k, generator=g, dtype=torch.float64)
    w_old = torch.randn(n, d_out, k, generator=g, dtype=torch.float64)
    target = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    u, v = closed_form_blocks(target, x, w_old, ridge=0.0)
    assert u.shape == (n, d_out, ctx) and v.shape == (n, ctx, k)  # stored as factors of rank ctx
    b = (u @ v).double()
    got = torch.einsum("nok,nck->nco", w_old + b, x)
    assert torch.allclose(got, target[:, None, :].expand_as(got), atol=1e-4)  # every context is written
    for i in range(n):  # the least-norm solution: rows of B lie in the span of the contexts' inputs
        r = target[i][:, None] - w_old[i] @ x[i].T  # [d_out, ctx]
        assert torch.allclose(b[i], r @ torch.linalg.pinv(x[i].T), atol=1e-4)
    lam = 0.5
    b = torch.bmm(*closed_form_blocks(target, x, w_old, ridge=lam)).double()
    for i in range(n):  # ridge: B = R (XᵀX + λ·mean‖x‖² I)⁻¹ Xᵀ with X = [k, ctx]
        xt = x[i].T
        r = target[i][:, None] - w_old[i] @ xt
        lam_i = lam * (xt * xt).sum(0).mean()
        assert torch.allclose(b[i], r @ torch.linalg.inv(xt.T @ xt + lam_i * torch.eye(ctx, dtype=xt.dtype)) @ xt.T,
                              atol=1e-4)


def test_edit_flips_and_unmatched_text_runs_the_base_model_exactly(tiny_lm, memoir):
    from kedit.editors.attach import attached

    lm = tiny_lm
    base_other = _logits(lm, memoir.other)
    base_prompt = _logits(lm, memoir.a["prompt"].format(memoir.a["subject"]))
    assert not _wins(lm, memoir.a)
    res = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None)
    assert res.deltas == {}
    assert torch.equal(_logits(lm, memoir.other), base_other)  # compute leaves the model as it was
    memoir.editor().attach(lm, res.state)
    assert attached(lm.model, "memoir") is not None
    assert memoir.fires(lm, res.state, memoir.a["prompt"].format(memoir.a["subject"])).tokens.numel() > 0
    assert _wins(lm, memoir.a)
    assert not torch.equal(_logits(lm, memoir.a["prompt"].format(memoir.a["subject"])), base_prompt)
    assert memoir.fires(lm, res.state, memoir.other).tokens.numel() == 0
    assert torch.equal(_logits(lm, memoir.other), base_other)


def test_layer_output_is_untouched_at_tokens_that_match_nothing(tiny_lm, memoir):
    """Per token: in a text where some tokens read the memory, every other token's down-projection
    output is the base one bit for bit."""
    from kedit.editors.memoir import attach
    from kedit.hooks import Trace

    lm = tiny_lm
    res = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None)
    text = memoir.a["prompt"].format(memoir.a["subject"]) + ". " + memoir.other
    name = lm.adapter.mlp_out_name(res.state.meta["layer"])
    ids = lm.tokenizer(text, return_tensors="pt").input_ids

    def out():
        with torch.no_grad(), Trace(lm.model, [name], retain_output=True) as tr:
            lm.model(input_ids=ids)
        return tr.outputs[name][0]

    base = out()
    att = attach(lm, res.state)
    fired = memoir.fires(lm, res.state, text).tokens
    assert 0 < fired.numel() < ids.shape[1]
    edited = out()
    rest = torch.ones(ids.shape[1], dtype=torch.bool)
    rest[fired] = False
    assert torch.equal(edited[rest], base[rest])
    assert not torch.equal(edited[fired], base[fired])
    att.remove()
    assert torch.equal(out(), base)


def _module_output(lm, state, name, ids):
    """The output of module ``name`` for ``ids`` (one text) with ``state``'s memory attached (None: the
    base model); the memory is removed again afterwards."""
    from kedit.editors.memoir import attach
    from kedit.hooks import Trace

    att = attach(lm, state) if state is not None else None
    try:
        with torch.no_grad(), Trace(lm.model, [name], retain_output=True) as tr:
            lm.model(input_ids=ids)
    finally:
        if att is not None:
            att.remove()
    return tr.outputs[name][0]


def test_read_scale_scales_what_a_reading_token_adds_and_nothing_else(tiny_lm, memoir):
    """``mm_read_scale`` s: a reading token's down-projection output is base + s · (what scale 1 adds);
    the other tokens stay the base ones bit for bit. The setting lives in the state (absent at 1.0, so
    states written without it read as before) and a later batch's hparams set it for every entry."""

    lm = tiny_lm
    res = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None)
    assert "read_scale" not in res.state.meta
    text = memoir.a["prompt"].format(memoir.a["subject"]) + ". " + memoir.other
    name = lm.adapter.mlp_out_name(res.state.meta["layer"])
    ids = lm.tokenizer(text, return_tensors="pt").input_ids

    def out(state=None):
        return _module_output(lm, state, name, ids)

    base, full = out(), out(res.state)
    half_state = res.state.copy()
    half_state.meta["read_scale"] = 0.5
    half = out(half_state)
    fired = memoir.fires(lm, res.state, text).tokens
    rest = torch.ones(ids.shape[1], dtype=torch.bool)
    rest[fired] = False
    assert fired.numel() > 0 and torch.equal(half[rest], base[rest])
    torch.testing.assert_close(half[fired] - base[fired], 0.5 * (full[fired] - base[fired]), atol=1e-5, rtol=1e-4)
    assert (half[fired] - base[fired]).norm() > 0
    scaled = memoir.editor(memoir.hp(mm_read_scale=0.5)).compute(lm, [memoir.req(memoir.b)], res.state,
                                                                 None).state
    assert scaled.meta["read_scale"] == 0.5 and scaled.meta["exact_read_scale"] == 1.0
    unscaled = memoir.editor().compute(lm, [memoir.req(memoir.b)], scaled, None).state.meta
    assert "read_scale" not in unscaled and "exact_read_scale" not in unscaled
    for key in ("mm_read_scale", "mm_exact_read_scale"):
        for bad in (0.0, 1.5):
            with pytest.raises(ValueError, match=key):
                memoir.hp(**{key: bad})


def test_exact_key_reads_take_their_own_scale(tiny_lm, memoir):
    """A token that reads its entry through the exact key adds ``mm_exact_read_scale`` of the entry's
    output change, one that reads it through the mask ``mm_read_scale``; a state from before the
    exact setting reads both at ``read_scale``."""

    lm = tiny_lm
    state = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None).state
    text = memoir.a["prompt"].format(memoir.a["subject"])
    name = lm.adapter.mlp_out_name(state.meta["layer"])
    ids = lm.tokenizer(text, return_tensors="pt").input_ids

    def out(st=None, **meta):
        if st is not None:
            st = st.copy()
            st.meta.update(meta)
        return _module_output(lm, st, name, ids)

    exact_only = state.copy()
    exact_only.meta["threshold"] = 1.0  # no mask read: the prompt's subject reads through its exact key
    by_mask = state.copy()
    del by_mask.tensors["mm.exact"], by_mask.meta["exact_threshold"]
    rd_x, rd_m = memoir.fires(lm, exact_only, text), memoir.fires(lm, by_mask, text)
    assert rd_x.tokens.numel() > 0 and bool(rd_x.exact.all())
    assert rd_m.tokens.numel() > 0 and not bool(rd_m.exact.any())
    base = out()
    for st, rd in ((exact_only, rd_x), (by_mask, rd_m)):
        full = out(st)[rd.tokens] - base[rd.tokens]
        assert full.norm() > 0
        got = out(st, read_scale=0.5, exact_read_scale=0.25)[rd.tokens] - base[rd.tokens]
        share = 0.25 if st is exact_only else 0.5
        torch.testing.assert_close(got, share * full, atol=1e-5, rtol=1e-4)
    old = out(exact_only, read_scale=0.5)[rd_x.tokens] - base[rd_x.tokens]  # no exact_read_scale in the state
    torch.testing.assert_close(old, 0.5 * (out(exact_only)[rd_x.tokens] - base[rd_x.tokens]), atol=1e-5, rtol=1e-4)


def test_text_inputs_are_the_modules_inputs_window_by_window(tiny_lm, memoir):
    from kedit.editors.memoir import text_inputs
    from kedit.hooks import Trace

    lm = tiny_lm
    name = lm.adapter.mlp_out_name(1)
    text = " ".join([memoir.other] * 3)
    ids, x = text_inputs(lm, name, text, max_tokens=11, window=4)
    want = lm.tokenizer(text, add_special_tokens=False).input_ids[:11]
    assert ids.tolist() == want and x.shape == (11, lm.adapter.key_dim(1))
    for i in range(0, 11, 4):  # each window is a fresh text of its own
        with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
            lm.model(input_ids=torch.tensor([want[i: i + 4]]), use_cache=False)
        torch.testing.assert_close(x[i: i + 4], tr.inputs[name][0].float())


def test_generation_and_scoring_do_not_depend_on_batching_or_cache(tiny_lm, memoir):
    """Reading is per token, so left-padded batched generation with a KV cache gives each prompt what
    it gets alone, and long-text NLLs equal the base where nothing matches."""
    from kedit.editors.memoir import attach
    from kedit.evaluation.metrics import greedy_tokens, token_nlls

    lm = tiny_lm
    base_nll = token_nlls(lm, memoir.other * 3, window=16)
    res = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None)
    attach(lm, res.state)
    prompts = [memoir.a["prompt"].format(memoir.a["subject"]), "Rome is the capital of", memoir.other]
    together = greedy_tokens(lm, prompts, k=4, batch_size=3)
    alone = torch.cat([greedy_tokens(lm, [p], k=4, batch_size=1) for p in prompts])
    assert torch.equal(together, alone)
    with torch.no_grad():
        full = lm.model(input_ids=lm.tokenizer(prompts[0], return_tensors="pt").input_ids).logits[0, -1]
    assert together[0, 0].item() == int(full.argmax())  # the first generated token is the edited prediction
    assert memoir.fires(lm, res.state, memoir.other * 3).tokens.numel() == 0
    assert torch.equal(token_nlls(lm, memoir.other * 3, window=16), base_nll)


@pytest.mark.parametrize("solver", ["vstar", "adam"])
def test_batched_training_equals_one_at_a_time(tiny_lm, solver, memoir, tiny_text):
    """Same start state: a batch of two gives each request the mask and block it gets alone (the
    losses are summed, each request owns its δ or block, finished requests freeze)."""
    from kedit.editors.memoir import BLOCK_U, BLOCK_V, EXACT, MASKS, W, initial_state, residual_matrix

    lm = tiny_lm
    # the tiny model's NLL plateaus near 5.4: requests stop at different steps
    hp = memoir.hp(mm_solver=solver, mm_stop_nll=5.42, v_stop_nll=5.4)
    s0 = initial_state(lm, hp, tiny_text)
    res = memoir.editor(hp).compute(lm, [memoir.req(memoir.a), memoir.req(memoir.b)], s0, None)
    steps = [d.vstar_steps for d in res.diagnostics]
    assert min(steps) < max(steps), steps  # one request froze while the other trained on
    # every request's target NLL (the solver's loss, log p read over vocabulary chunks) went down
    assert all(d.vstar_loss_end < d.vstar_loss_start for d in res.diagnostics), res.diagnostics
    both = res.state
    a = memoir.editor(hp).compute(lm, [memoir.req(memoir.a)], s0, None).state
    b = memoir.editor(hp).compute(lm, [memoir.req(memoir.b)], s0, None).state
    assert torch.equal(both.tensors[MASKS], torch.cat([a.tensors[MASKS], b.tensors[MASKS]]))
    for key in (BLOCK_U, BLOCK_V):
        assert torch.allclose(both.tensors[key], torch.cat([a.tensors[key], b.tensors[key]]), rtol=1e-4, atol=1e-6)
    assert torch.equal(both.tensors[W], residual_matrix(both.tensors[MASKS], both.tensors[BLOCK_U],
                                                        both.tensors[BLOCK_V], lm.adapter.key_dim()))
    assert both.meta["entry_owner"] == ["a", "b"]
    assert torch.equal(both.tensors[EXACT], torch.cat([a.tensors[EXACT], b.tensors[EXACT]]))


def test_state_round_trip_is_bit_exact_and_attach_is_idempotent(tiny_lm, tmp_path, memoir):
    from kedit.editors.io import load_state, save_edit
    from kedit.editors.memoir import attach

    lm = tiny_lm
    res = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None)
    res = memoir.editor().compute(lm, [memoir.req(memoir.b)], res.state, None)  # a second batch on top
    save_edit(tmp_path / "e", res)
    back = load_state(tmp_path / "e")
    assert back.method == "memoir" and back.meta == res.state.meta
    assert set(back.tensors) == set(res.state.tensors)
    for k, v in res.state.tensors.items():
        assert v.dtype == back.tensors[k].dtype and torch.equal(v, back.tensors[k]), k
    prompt = memoir.a["prompt"].format(memoir.a["subject"])
    attach(lm, res.state)
    once = _logits(lm, prompt)
    module = lm.adapter.mlp_out(res.state.meta["layer"])
    attach(lm, back)
    attach(lm, back)
    assert len(module._forward_hooks) == 1
    assert torch.equal(_logits(lm, prompt), once)


def test_exact_key_is_the_bare_prompts_fingerprint_and_old_states_get_their_masks(tiny_lm, memoir):
    """Each entry's exact key is the fingerprint of its own prompt's subject token (no prefix); with it
    the prompt fires even at a mask threshold it does not reach; a state written before exact keys
    existed gets its entries' masks as exact keys when it is edited further."""
    from kedit.editors.memoir import BG, EXACT, MASKS, PERM, fingerprint
    from kedit.hooks import Trace

    lm = tiny_lm
    hp = memoir.hp(n_prefixes=2, prefix_len=3)
    res = memoir.editor(hp).compute(lm, [memoir.req(memoir.a)], None, None)
    st = res.state
    assert st.meta["exact_threshold"] == hp.mm_exact_threshold and st.tensors[EXACT].shape == (1, hp.mm_k)
    name = lm.adapter.mlp_out_name(st.meta["layer"])
    ids = lm.tokenizer(memoir.a["prompt"].format(memoir.a["subject"]), return_tensors="pt").input_ids
    with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
        lm.model(input_ids=ids)
    x_subj = tr.inputs[name][0, -1]  # the subject ends the prompt
    assert torch.equal(st.tensors[EXACT][0], fingerprint(x_subj, st.tensors[BG], st.tensors[PERM], hp.mm_k))
    strict = st.copy()
    strict.meta["threshold"] = 1.0  # no mask reads at all: only the exact key
    assert memoir.fires(lm, strict,
                        memoir.a["prompt"].format(memoir.a["subject"])).tokens.tolist() == [ids.shape[1] - 1]
    old = st.copy()
    del old.tensors[EXACT]
    del old.meta["exact_threshold"]
    new = memoir.editor(hp).compute(lm, [memoir.req(memoir.b)], old, None).state
    assert torch.equal(new.tensors[EXACT][0], st.tensors[MASKS][0]) and new.tensors[EXACT].shape[0] == 2
    off = memoir.editor(memoir.hp(n_prefixes=2, prefix_len=3,
                                  mm_exact_key=False)).compute(lm, [memoir.req(memoir.a)], None, None).state
    assert EXACT not in off.tensors and "exact_threshold" not in off.meta
    with pytest.raises(ValueError, match="mm_exact_threshold"):
        memoir.hp(mm_exact_threshold=0.0)


def test_retract_restores_one_fact_exactly_and_keeps_the_other(tiny_lm, memoir):
    from kedit.editors.memoir import BLOCK_U, EXACT, attach, retract

    lm = tiny_lm
    pa = memoir.a["prompt"].format(memoir.a["subject"])
    base_a = _logits(lm, pa)
    res = memoir.editor().compute(lm, [memoir.req(memoir.a), memoir.req(memoir.b)], None, None)
    attach(lm, res.state)
    assert _wins(lm, memoir.a) and _wins(lm, memoir.b)
    less = retract(res.state, "a")
    assert less.meta["entry_owner"] == ["b"] and less.tensors[BLOCK_U].shape[0] == 1
    assert torch.equal(less.tensors[EXACT], res.state.tensors[EXACT][1:])
    assert res.state.meta["entry_owner"] == ["a", "b"]  # the old state is left as it was
    attach(lm, less)
    assert memoir.fires(lm, less, pa).tokens.numel() == 0
    assert torch.equal(_logits(lm, pa), base_a)
    assert _wins(lm, memoir.b)
    with pytest.raises(KeyError, match="no entry"):
        retract(less, "a")


def test_own_read_keeps_every_other_fact_exact_when_masks_share_columns(tiny_lm, memoir):
    """``mm_read: own``: a token reads its entry's block alone, so retracting a fact whose columns
    overlap another fact's leaves the other fact's logits bit for bit; ``shared`` W' does not."""
    from kedit.editors.memoir import BLOCK_U, BLOCK_V, MASKS, W, attach, own_block_delta, retract

    lm = tiny_lm
    pb = memoir.b["prompt"].format(memoir.b["subject"])
    for read in ("own", "shared"):
        hp = memoir.hp(mm_read=read,
                       mm_k=48)  # wide masks on the tiny model's 128 columns: the two facts overlap
        res = memoir.editor(hp).compute(lm, [memoir.req(memoir.a), memoir.req(memoir.b)], None, None)
        m = res.state.tensors[MASKS]
        assert set(m[0].tolist()) & set(m[1].tolist())
        attach(lm, res.state)
        edited_b = _logits(lm, pb)
        attach(lm, retract(res.state, "a"))
        assert torch.equal(_logits(lm, pb), edited_b) == (read == "own"), read
    # the per-entry read is U_e V_e x[M_e]
    g = torch.Generator().manual_seed(3)
    x, u, v = torch.randn(2, 128, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(2, 3, 48, generator=g)
    cols = res.state.tensors[MASKS]
    want = torch.stack([u[i] @ v[i] @ x[i, cols[i]] for i in range(2)])
    assert torch.allclose(own_block_delta(x, cols, u, v), want, atol=1e-5)
    assert BLOCK_U in res.state.tensors and BLOCK_V in res.state.tensors and W in res.state.tensors


def test_bad_settings_and_foreign_state_are_refused(tiny_lm, memoir):
    from kedit.editors.base import EditorState
    from kedit.editors.hparams import EditHparams

    with pytest.raises(ValueError, match="mm_threshold"):
        EditHparams(method="memoir", mm_threshold=1.5)
    with pytest.raises(ValueError, match="mm_layer"):
        memoir.editor(memoir.hp(mm_layer=3)).compute(tiny_lm, [memoir.req(memoir.a)], None, None)
    with pytest.raises(ValueError, match="not 'memoir'"):
        memoir.editor().compute(tiny_lm, [memoir.req(memoir.a)], EditorState("alphaedit"), None)


def test_warm_start_is_the_mean_stored_vstar_of_the_same_object():
    from kedit.editors.memoir import warm_start

    g = torch.Generator().manual_seed(0)
    vs = torch.randn(4, 5, generator=g)
    init, hits = warm_start(["Paris", "Rome", " Paris", None], vs, ["Paris ", "Berlin", "Rome"])
    assert hits == 2
    mean = (vs[0] + vs[2]) / 2  # the mean's direction at the entries' mean length
    assert torch.allclose(init[0], mean / mean.norm() * (vs[0].norm() + vs[2].norm()) / 2)
    assert torch.allclose(init[2], vs[1])
    assert torch.count_nonzero(init[1]) == 0  # a new object starts from 0
    empty, none = warm_start([], torch.zeros(0, 5), ["Paris"])
    assert none == 0 and torch.count_nonzero(empty) == 0


def test_warm_start_stores_each_entrys_vstar_and_starts_the_same_object_there(tiny_lm, monkeypatch, memoir):
    from kedit.editors import vstar as vstar_mod
    from kedit.editors.memoir import VSTAR, retract

    lm = tiny_lm
    starts = []
    real = vstar_mod.optimise_vstar
    monkeypatch.setattr(vstar_mod, "optimise_vstar",
                        lambda *a, **k: starts.append(k.get("init")) or real(*a, **k))
    ed = memoir.editor(memoir.hp(mm_warm_start=True))
    first = ed.compute(lm, [memoir.req(memoir.a), memoir.req(memoir.b)], None, None)
    assert starts[0] is None  # an empty memory has nothing to start from
    st = first.state
    assert st.meta["entry_target"] == ["Tokyo", "Dutch"] and st.tensors[VSTAR].shape == (2, lm.adapter.out_dim(1))
    assert first.layer_info["memory"]["warm_started"] == 0.0
    c = dict(memoir.a, subject="Danielle Darrieux", id="c")  # the object "Tokyo" again, and a new one
    d = dict(memoir.b, target_new="Greek", id="d")
    second = ed.compute(lm, [memoir.req(c), memoir.req(d)], st, None)
    assert torch.allclose(starts[1][0], st.tensors[VSTAR][0]) and torch.count_nonzero(starts[1][1]) == 0
    assert second.layer_info["memory"]["warm_started"] == 1.0
    assert second.state.meta["entry_target"] == ["Tokyo", "Dutch", "Tokyo", "Greek"]
    assert torch.equal(second.state.tensors[VSTAR][:2], st.tensors[VSTAR])
    less = retract(second.state, "a")  # the retracted fact's v* no longer starts anything
    assert less.meta["entry_target"] == ["Dutch", "Tokyo", "Greek"]
    assert torch.equal(less.tensors[VSTAR], second.state.tensors[VSTAR][1:])
    # written without it: no v* kept; an old memory gets zeros and unknown objects for its entries
    off = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None).state
    assert VSTAR not in off.tensors and "entry_target" not in off.meta
    on = ed.compute(lm, [memoir.req(memoir.b)], off, None).state
    assert on.meta["entry_target"] == [None, "Dutch"] and torch.count_nonzero(on.tensors[VSTAR][0]) == 0


def test_scheduled_share_interpolates_between_its_points_and_holds_past_its_ends():
    from kedit.editors.memoir import scheduled_share

    sched = [[3000, 1.0], [10000, 0.7], [20000, 0.5]]
    assert scheduled_share(sched, 0) == 1.0 and scheduled_share(sched, 3000) == 1.0
    assert scheduled_share(sched, 6500) == pytest.approx(0.85)
    assert scheduled_share(sched, 10000) == pytest.approx(0.7)
    assert scheduled_share(sched, 15000) == pytest.approx(0.6)
    assert scheduled_share(sched, 50000) == 0.5
    assert scheduled_share([[5, 0.4]], 1) == scheduled_share([[5, 0.4]], 9) == 0.4


def test_read_scale_by_entries_sets_the_mask_reads_share_from_the_memorys_size(tiny_lm, memoir):
    """``mm_read_scale_by_entries``: the state keeps the schedule; its mask reads take the share at its own
    number of entries (so a memory softens as it grows), exact-key reads ``mm_exact_read_scale``; a batch
    without the setting removes it; malformed schedules are refused with the setting's name."""
    from kedit.editors.memoir import exact_read_scale, read_scale

    lm = tiny_lm
    hp = memoir.hp(mm_read_scale_by_entries=[[1, 1.0], [3, 0.5]])
    one = memoir.editor(hp).compute(lm, [memoir.req(memoir.a)], None, None).state
    assert one.meta["read_scale_by_entries"] == [[1, 1.0], [3, 0.5]] and "read_scale" not in one.meta
    assert read_scale(one) == 1.0 and exact_read_scale(one) == 1.0
    two = memoir.editor(hp).compute(lm, [memoir.req(memoir.b)], one, None).state
    assert read_scale(two) == pytest.approx(0.75) and exact_read_scale(two) == 1.0
    plain = memoir.editor().compute(lm, [memoir.req(memoir.a)], two, None).state
    assert "read_scale_by_entries" not in plain.meta and read_scale(plain) == 1.0
    # mm_exact_read_scale null: exact-key reads take the mask reads' scheduled share
    follow = memoir.editor(memoir.hp(mm_read_scale_by_entries=[[1, 1.0], [3, 0.5]], mm_exact_read_scale=None))
    two_f = follow.compute(lm, [memoir.req(memoir.b)], follow.compute(lm, [memoir.req(memoir.a)], None, None).state,
                           None).state
    assert "exact_read_scale" not in two_f.meta
    assert exact_read_scale(two_f) == read_scale(two_f) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="mm_exact_read_scale"):
        memoir.hp(mm_exact_read_scale=True)
    for bad in ([], [[3, 1.0], [1, 0.5]], [[1, 0.0]], [[1.5, 1.0]], "0.5"):
        with pytest.raises(ValueError, match="mm_read_scale_by_entries"):
            memoir.hp(mm_read_scale_by_entries=bad)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_read_changes_the_residual_stream_by_exactly_its_entrys_change(family, tiny_tokenizer,
                                                                          tiny_model_factory, memoir):
    """v* computes an entry's change for the residual stream; a reading token's layer output moves by
    exactly that change, also where a norm follows the MLP (Gemma 3's ``post_feedforward_layernorm``:
    added at the down-projection, it would reach the stream rescaled and turned). Every other token's
    layer output is the base one bit for bit."""
    from kedit.editors.memoir import BLOCK_U, BLOCK_V, MASKS, W, attach, memory_delta, own_block_delta
    from kedit.editors.memoir.read import exact_read_scale, read_scale, reads_own_block
    from kedit.hooks import Trace
    from kedit.models.store import wrap_model

    lm = wrap_model(tiny_model_factory(family), tiny_tokenizer, slug=f"tiny-{family}")
    assert (lm.adapter.residual_out_name(1) != lm.adapter.mlp_out_name(1)) == (family == "gemma3_text")
    state = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None).state
    layer = int(state.meta["layer"])
    text = memoir.a["prompt"].format(memoir.a["subject"]) + ". " + memoir.other
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    block, down = lm.adapter.layer_name(layer), lm.adapter.mlp_out_name(layer)

    def run():
        with torch.no_grad(), Trace(lm.model, [block, down], retain_input=True, retain_output=True) as tr:
            lm.model(input_ids=ids)
        out = tr.outputs[block]
        return (out[0] if isinstance(out, tuple) else out)[0], tr.inputs[down][0]

    base, x = run()
    rd = memoir.fires(lm, state, text)
    assert 0 < rd.tokens.numel() < ids.shape[1]
    cols = state.tensors[MASKS][rd.entry]
    want = own_block_delta(x[rd.tokens], cols, state.tensors[BLOCK_U][rd.entry], state.tensors[BLOCK_V][rd.entry]) \
        if reads_own_block(state) else memory_delta(x[rd.tokens], cols, state.tensors[W])
    want = want * torch.where(rd.exact, exact_read_scale(state), read_scale(state))[:, None]
    assert want.norm() > 0
    att = attach(lm, state)
    edited, _ = run()
    att.remove()
    rest = torch.ones(ids.shape[1], dtype=torch.bool)
    rest[rd.tokens] = False
    assert torch.equal(edited[rest], base[rest])
    torch.testing.assert_close(edited[rd.tokens] - base[rd.tokens], want, atol=1e-5, rtol=1e-4)
