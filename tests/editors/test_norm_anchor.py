"""Norm-anchored v* (NAS): the rescale and skip rule against direct computation, the anchor cache, and
the editors' reporting of skipped facts, on a tiny random Llama."""

import json

import pytest
import torch

from kedit.editors import norm_anchor
from kedit.editors.base import EditorState, apply_deltas
from kedit.editors.common import KeyStats
from kedit.editors.hparams import EditHparams, load_hparams
from kedit.editors.keys import SubjectStates
from kedit.editors.prompts import subject_rows
from kedit.editors.registry import get_editor
from kedit.editors.vstar import VSTAR_FIELDS, optimise_vstar


@pytest.fixture(autouse=True)
def _fresh_memo():
    norm_anchor.clear_memo()
    yield
    norm_anchor.clear_memo()


def test_trimmed_mean_drops_the_top_five_percent():
    vals = torch.arange(1.0, 41.0)  # 40 values: floor(0.05 * 40) = 2 dropped (39, 40)
    assert norm_anchor.trimmed_mean(vals) == pytest.approx(float(torch.arange(1.0, 39.0).mean()))
    assert norm_anchor.trimmed_mean(torch.tensor([3.0, 5.0])) == pytest.approx(4.0)  # nothing to drop
    with pytest.raises(ValueError, match="non-finite"):
        norm_anchor.trimmed_mean(torch.tensor([1.0, float("nan")]))


def test_anchor_plan_rescales_to_the_anchor_and_skips_outliers():
    g = torch.Generator().manual_seed(0)
    mlp0 = torch.randn(6, 16, generator=g, dtype=torch.float64)
    delta = torch.randn(6, 16, generator=g, dtype=torch.float64)
    delta[2] *= 20  # an outlier v*
    anchor = float((mlp0 + delta).norm(dim=1)[[0, 1, 3, 4, 5]].mean())
    plan = norm_anchor.anchor_plan(mlp0, delta.to(torch.float32), anchor, 2.0)
    m = mlp0 + delta
    ratio = m.norm(dim=1) / anchor
    assert torch.allclose(plan.ratio, ratio)
    assert plan.keep.tolist() == (ratio <= 2.0).tolist() and not plan.keep[2]
    applied = mlp0 + plan.delta.to(torch.float64)
    kept = plan.keep
    # kept rows: the new MLP output target has the anchor's norm and the old target's direction
    assert torch.allclose(applied[kept].norm(dim=1), torch.full((int(kept.sum()),), anchor, dtype=torch.float64),
                          rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(applied[kept], m[kept], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert torch.equal(plan.delta[~kept], torch.zeros_like(plan.delta[~kept]))  # skipped: no change at all
    with pytest.raises(ValueError, match="positive"):
        norm_anchor.anchor_plan(mlp0, delta, 0.0, 2.0)


def test_hparams_validate_the_anchor_settings():
    assert EditHparams().v_norm_anchor is False  # off by default
    with pytest.raises(ValueError, match="v_norm_skip_factor"):
        EditHparams(v_norm_anchor=True, v_norm_skip_factor=0.5)
    with pytest.raises(ValueError, match="v_norm_anchor must be"):
        EditHparams(v_norm_anchor="yes")
    with pytest.raises(ValueError, match="not rome"):
        EditHparams(method="rome", v_norm_anchor=True)
    assert load_hparams("alphaedit", overrides={"v_norm_anchor": True, "v_norm_skip_factor": "3"}) \
        .v_norm_skip_factor == 3.0


def _key_stats(lm, tmp_path, stats_of):
    mom2 = stats_of(lm, rank=lm.adapter.key_dim() // 2)
    return KeyStats(mom2=mom2, key="stats-key-1", dir=tmp_path / "stats")


def test_editor_rescales_every_applied_vstar_to_the_cached_anchor(tiny_lm, tmp_path, weight_edit):
    lm = tiny_lm
    hp = weight_edit.hp("alphaedit", v_norm_anchor=True, v_norm_skip_factor=100.0)
    stats = _key_stats(lm, tmp_path, weight_edit.stats)
    prefixes = weight_edit.prefixes(lm, hp, tmp_path)
    layer = hp.resolve_layers(lm.adapter.num_layers)[-1]
    vs = optimise_vstar(lm, weight_edit.reqs, prefixes, hp, layer)
    keys, _ = SubjectStates(lm, subject_rows(lm.tokenizer, weight_edit.reqs, prefixes), layer,
                            layer).read(lm, [layer])
    mlp0 = (lm.adapter.weight(layer).double() @ keys[layer]).T  # direct: the MLP output at the subject
    norms = (mlp0 + vs.delta.double()).norm(dim=1)
    want_anchor = float(norms.mean())  # 3 values: nothing trimmed

    res = get_editor("alphaedit", hp, cache_dir=tmp_path).compute(lm, weight_edit.reqs, None, stats, vstar=vs)
    info = res.layer_info["norm_anchor"]
    assert info["anchor_norm"] == pytest.approx(want_anchor, rel=1e-6)
    assert info["n_skipped"] == 0 and not any(d.norm_anchor_skipped for d in res.diagnostics)
    # each applied δ' puts the MLP output target exactly on the anchor norm
    applied = torch.tensor([d.delta_norm for d in res.diagnostics], dtype=torch.float64)
    scaled = (mlp0 + vs.delta.double()) * (want_anchor / norms)[:, None] - mlp0
    assert torch.allclose(applied, scaled.norm(dim=1), rtol=1e-4)
    # the anchor was written beside the statistics, keyed by model, layer and v* settings
    files = list((tmp_path / "stats" / "vstar_anchor").glob(f"L{layer}_*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["anchor"] == pytest.approx(want_anchor) and saved["model_hash"] == lm.manifest.model_hash
    assert saved["request_ids"] == ["a", "b", "c"]
    assert res.state.meta["n_edits"] == 3


def test_anchor_cache_is_reused_and_keyed_by_vstar_settings(tiny_lm, tmp_path, weight_edit):
    lm = tiny_lm
    hp = weight_edit.hp("alphaedit", v_norm_anchor=True, v_norm_skip_factor=100.0)
    stats = _key_stats(lm, tmp_path, weight_edit.stats)
    layer = hp.resolve_layers(lm.adapter.num_layers)[-1]
    ed = get_editor("alphaedit", hp, cache_dir=tmp_path)
    r1 = ed.compute(lm, weight_edit.reqs[:2], None, stats)
    files = list((tmp_path / "stats" / "vstar_anchor").glob("*.json"))
    assert len(files) == 1
    # plant a different anchor in the file: a fresh process (memo cleared) must read it, not recompute
    data = json.loads(files[0].read_text())
    data["anchor"] = 1.2345
    files[0].write_text(json.dumps(data))
    norm_anchor.clear_memo()
    apply_deltas(lm.model, r1.deltas)
    r2 = ed.compute(lm, weight_edit.reqs[2:], r1.state, stats)
    assert r2.layer_info["norm_anchor"]["anchor_norm"] == 1.2345
    # other v* settings (another key) on an already-edited model: no base-model anchor, a clear error
    other = get_editor("alphaedit", weight_edit.hp("alphaedit", v_norm_anchor=True, v_lr=0.1),
                       cache_dir=tmp_path)
    with pytest.raises(ValueError, match="base model"):
        other.compute(lm, weight_edit.reqs[2:], r1.state, stats)
    # the same settings on another layer set give another key and file
    assert norm_anchor.anchor_key("h", layer, {"v_lr": 0.5}) != norm_anchor.anchor_key("h", layer, {"v_lr": 0.1})
    assert norm_anchor.anchor_key("h", layer, {"v_lr": 0.5}) != norm_anchor.anchor_key("g", layer, {"v_lr": 0.5})
    assert norm_anchor.anchor_key("h", 1, {}) != norm_anchor.anchor_key("h", 2, {})


def test_skipped_requests_are_reported_and_not_written(tiny_lm, tmp_path, weight_edit):
    lm = tiny_lm
    stats = _key_stats(lm, tmp_path, weight_edit.stats)
    hp = weight_edit.hp("memit", v_norm_anchor=True, v_norm_skip_factor=1.0)
    layer = hp.resolve_layers(lm.adapter.num_layers)[-1]
    prefixes = weight_edit.prefixes(lm, hp, tmp_path)
    vs = optimise_vstar(lm, weight_edit.reqs, prefixes, hp, layer)
    # anchor the batch with a pre-set anchor between the norms, so some requests lie above it
    keys, _ = SubjectStates(lm, subject_rows(lm.tokenizer, weight_edit.reqs, prefixes), layer,
                            layer).read(lm, [layer])
    norms = ((lm.adapter.weight(layer).double() @ keys[layer]).T + vs.delta.double()).norm(dim=1)
    key = norm_anchor.anchor_key(lm.manifest.model_hash, layer, {f: getattr(hp, f) for f in VSTAR_FIELDS})
    mid = float(norms.sort().values[1]) * (1 - 1e-6)  # only the smallest norm is at or below the anchor
    norm_anchor._ANCHOR_MEMO[key] = mid
    res = get_editor("memit", hp, cache_dir=tmp_path).compute(lm, weight_edit.reqs,
                                                              EditorState("memit", meta={
        "n_edits": 0, "n_batches": 0, "layers": hp.resolve_layers(lm.adapter.num_layers),
        "model_hash": lm.manifest.model_hash}), stats, vstar=vs)
    skipped = {d.request_id for d in res.diagnostics if d.norm_anchor_skipped}
    want = {r.id for r, n in zip(weight_edit.reqs, norms.tolist()) if n > mid}
    assert skipped == want and len(skipped) == 2
    info = res.layer_info["norm_anchor"]
    assert info["n_skipped"] == 2 and {k.split(":", 1)[1] for k in info if k.startswith("skipped:")} == want
    assert res.state.meta["n_edits"] == 1  # only the applied fact counts
    # everything skipped: zero deltas, every id reported
    norm_anchor._ANCHOR_MEMO[key] = float(norms.min()) / 2
    none = get_editor("memit", hp, cache_dir=tmp_path).compute(lm, weight_edit.reqs, None, stats, vstar=vs)
    assert all(float(d.abs().max()) == 0 for d in none.deltas.values())
    assert all(d.norm_anchor_skipped for d in none.diagnostics)
    assert none.layer_info["norm_anchor"]["n_skipped"] == 3


def test_anchor_off_leaves_the_editor_unchanged(tiny_lm, tmp_path, weight_edit):
    lm = tiny_lm
    stats = _key_stats(lm, tmp_path, weight_edit.stats)
    res = get_editor("alphaedit", weight_edit.hp("alphaedit"),
                     cache_dir=tmp_path).compute(lm, weight_edit.reqs, None, stats)
    assert "norm_anchor" not in res.layer_info
    assert not (tmp_path / "stats" / "vstar_anchor").exists()
