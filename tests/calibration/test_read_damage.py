"""The read-share rule's measurements: the pure rules against direct computations, and the forced-read
damage on a tiny model against a read added by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kedit.calibration import read_damage as R


def _poisson_cdf(k: int, mu: float) -> float:
    return sum(math.exp(-mu) * mu ** i / math.factorial(i) for i in range(k + 1))


@pytest.mark.parametrize("events", [0, 1, 3, 11, 40])
def test_poisson_upper_bound_leaves_five_percent_below(events):
    mu = R.poisson_upper(events, 0.95)
    assert _poisson_cdf(events, mu) == pytest.approx(0.05, abs=1e-6)
    assert mu > events
    if events == 0:
        assert mu == pytest.approx(-math.log(0.05), rel=1e-6)
    with pytest.raises(ValueError):
        R.poisson_upper(-1)


def test_power_law_exponent_recovers_the_slope_and_clips():
    shares = [1.0, 0.7, 0.5]
    assert R.power_law_exponent(shares, [3.0 * s ** 2.2 for s in shares]) == pytest.approx(2.2)
    # noisy points: the least-squares slope of log D on log s
    d = [4.0, 2.0, 1.2]
    xs, ys = [math.log(s) for s in shares], [math.log(v) for v in d]
    mx, my = sum(xs) / 3, sum(ys) / 3
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert R.power_law_exponent(shares, d) == pytest.approx(slope)
    assert R.power_law_exponent(shares, [1.0, 1.0, 1.0]) == 1.0  # flat: clipped up to 1
    assert R.power_law_exponent(shares, [1.0, -0.1, 0.0]) == 4.0  # unresolved: the steep default


def test_fire_budget_and_floor_rules():
    assert R.fire_budget_from_damage(0.02, 40.0) == pytest.approx(math.log(1.02) / 40.0)
    assert R.fire_budget_from_damage(0.02, 0.0) == 1.0
    with pytest.raises(ValueError):
        R.fire_budget_from_damage(0.0, 1.0)
    shares = [1.0, 0.9, 0.8, 0.7, 0.6]
    assert R.lowest_keeping_share(shares, [2.0, 2.0, 1.98, 1.9, 2.0], 0.97) == 0.8  # stops at the first drop
    assert R.lowest_keeping_share(shares, [2.0] * 5, 0.97) == 0.6
    assert R.lowest_keeping_share(shares[::-1], [2.0, 1.0, 2.0, 2.0, 2.0], 0.97) == 0.8  # any order


def _by_hand(lm, state, windows, pos, entry, share):
    """Summed window NLL with the entry's block added at ``pos`` by plain hooks (no kedit attach): the
    change is computed from the down-projection's input and added where the MLP's output joins the
    residual stream (after Gemma 3's post-feed-forward norm, at the down-projection elsewhere)."""
    from kedit.editors.memoir import BLOCK_U, BLOCK_V, MASKS

    layer = int(state.meta["layer"])
    modules = dict(lm.model.named_modules())
    down, join = modules[lm.adapter.mlp_out_name(layer)], modules[lm.adapter.residual_out_name(layer)]
    out, held = [], {}
    for w, p, e in zip(windows, pos.tolist(), entry.tolist()):
        def take(_m, args, output, p=p, e=e):
            x = args[0][0, p]
            cols = state.tensors[MASKS][e]
            u, v = state.tensors[BLOCK_U][e].float(), state.tensors[BLOCK_V][e].float()
            held["delta"] = (u @ (v @ x[cols].float())) * share

        def add(_m, args, output, p=p):
            output = output.clone()
            output[0, p] += held["delta"].to(output.dtype)
            return output
        hs = [down.register_forward_hook(take), join.register_forward_hook(add)] if share is not None else []
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([w])).logits[0].float()
        finally:
            for h in hs:
                h.remove()
        lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(w[1:])[:, None])
        out.append(-float(lp.double().sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_forced_read_damage_equals_a_read_added_by_hand(family, tiny_tokenizer, tiny_model_factory, memoir,
                                                        tiny_text, one_thread):
    from kedit.calibration.fingerprints import general_token_ids
    from kedit.models.store import wrap_model

    lm = wrap_model(tiny_model_factory(family), tiny_tokenizer, slug=f"tiny-{family}")
    state = memoir.editor().compute(lm, [memoir.req(memoir.a), memoir.req(memoir.b)]).state
    windows = general_token_ids(lm, tiny_text * 3, 400, window=40)
    res = R.measure_read_damage(lm, state, windows, shares=(1.0, 0.5), batch=3)
    wins = [w for w in windows if len(w) >= 3]
    assert res.windows == len(wins) and res.entries == 2
    name = lm.adapter.mlp_out_name(int(state.meta["layer"]))
    from kedit.hooks import Trace
    inputs = []
    for w in wins:
        with torch.no_grad(), Trace(lm.model, [name], retain_input=True, stop=True) as tr:
            lm.model(input_ids=torch.tensor([w]))
        inputs.append(tr.inputs[name][0].float())
    pos, entry, ov = R.nearest_reads(state, inputs)
    assert ((pos > 0) & (pos < torch.tensor([len(w) - 1 for w in wins]))).all()
    clean = _by_hand(lm, state, wins, pos, entry, None)
    for s, d in zip(res.shares, res.damage):
        direct = float((_by_hand(lm, state, wins, pos, entry, s) - clean).mean())
        assert d == pytest.approx(direct, abs=1e-3)
    assert res.damage[0] != 0.0  # a read changes the text after it
    # the attachment is gone afterwards: the model is as it was
    with torch.no_grad():
        again = lm.model(input_ids=torch.tensor([wins[0]])).logits[0].float()
        lp = torch.log_softmax(again[:-1], -1).gather(1, torch.tensor(wins[0][1:])[:, None])
    assert -float(lp.double().sum()) == pytest.approx(float(clean[0]), abs=1e-4)
