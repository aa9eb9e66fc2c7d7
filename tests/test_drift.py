"""Drift gate: the candidate against the base model, on tiny random models (real lineage, real cache)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from kedit import params as P
from kedit.evaluation import metrics as M
from kedit.evaluation.canary import build_canary
from kedit.evaluation.drift import (
    DriftPolicy,
    base_reference,
    build_drift_gate,
    drift_label,
    drift_summary,
    perplexity_increase_pct,
)
from kedit.evaluation.gates import GatePolicy, run_gates
from kedit.models.store import wrap_model
from tests.test_gates import CANARY, POLICY, REF_TEXT, damaged, sharp_lm  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {**POLICY, "max_fluency_drop": None}


def nudged(lm, scale: float, slug: str, layer: int = 1, seed: int = 0):
    """``lm`` with ``down_proj += scale * sigma * eps`` on one layer (a copy: ``lm`` is untouched)."""
    model = copy.deepcopy(lm.model)
    w = model.model.layers[layer].mlp.down_proj.weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w += scale * w.std() * torch.randn(w.shape, generator=g)
    return wrap_model(model, lm.tokenizer, slug=slug)


class ForwardCounter:
    """Counts forward calls of a model (the base must not run when its reference is cached)."""

    def __init__(self, lm):
        self.n = 0
        lm.model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def test_perplexity_increase_is_the_ratio():
    assert perplexity_increase_pct(20.0, 23.0) == pytest.approx(15.0)
    assert perplexity_increase_pct(20.0, 20.0) == 0.0


def test_small_step_from_a_drifted_champion_fails_on_drift_only(sharp_lm, tmp_path):  # noqa: F811
    """Each night's step is small (passes against the champion), but the sum since base is not."""
    champion = damaged(sharp_lm, scale=50.0)  # where many nights have taken the model
    candidate = nudged(champion, 0.01, "candidate", layer=2)  # tonight's small step
    policy = GatePolicy(**FAST)
    suite = build_canary(champion, prompts=CANARY)
    without = run_gates(champion, candidate, policy, canary=suite, reference_text=REF_TEXT, progress=False)
    assert without.passed, without.reasons  # the champion-only gate lets it through
    drift = build_drift_gate(sharp_lm, sharp_lm.manifest.model_hash, CANARY, DriftPolicy(), canary_k=1,
                             text=REF_TEXT, reference_tokens=policy.reference_tokens, cache=tmp_path / "cache")
    rep = run_gates(champion, candidate, policy, canary=suite, reference_text=REF_TEXT, progress=False, drift=drift)
    assert not rep.passed
    champ = [c for c in rep.checks if c.against == "champion"]
    base = {c.name: c for c in rep.checks if c.against == "base"}
    assert all(c.passed for c in champ) and len(champ) == len(without.checks)
    assert set(base) == {"drift_perplexity_increase_pct", "drift_canary_agreement", "drift_neighbourhood_kl"}
    ppl = base["drift_perplexity_increase_pct"]
    assert not ppl.passed and ppl.value > 10.0
    # the number is the direct computation: base PPL from its own model, candidate PPL measured afresh
    p0 = M.perplexity(sharp_lm, REF_TEXT, max_tokens=policy.reference_tokens)
    p1 = M.perplexity(candidate, REF_TEXT, max_tokens=policy.reference_tokens)
    assert ppl.value == pytest.approx(100 * (p1 / p0 - 1), rel=1e-6)
    kl = M.neighbourhood_kl(M.next_token_logprobs(sharp_lm, CANARY), M.next_token_logprobs(candidate, CANARY))
    assert base["drift_neighbourhood_kl"].value == pytest.approx(kl, rel=1e-5)
    assert any(r.startswith("drift_perplexity_increase_pct (against base)") for r in rep.reasons), rep.reasons
    assert all(r.startswith("drift_") for r in rep.reasons)
    # the report: the drift checks are their own section, not rows of the champion table
    rep.save(tmp_path / "gate")
    md = (tmp_path / "gate" / "gate.md").read_text()
    head, _, tail = md.partition("## Against base")
    assert tail and "drift_perplexity_increase_pct" in tail and "drift_" not in head and "FAILED" in head
    assert (tmp_path / "gate" / "gate.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert {c["against"] for c in data["checks"]} == {"champion", "base"}
    summary = drift_summary(rep.checks, sharp_lm.manifest.model_hash)
    assert summary["perplexity_increase_pct"] == ppl.value and summary["passed"] is False
    assert drift_label({"drift": summary}).startswith(f"drift ppl +{ppl.value:.1f}%")


def test_an_undrifted_candidate_passes_against_base(sharp_lm, tmp_path):  # noqa: F811
    twin = wrap_model(copy.deepcopy(sharp_lm.model), sharp_lm.tokenizer, slug="twin")
    drift = build_drift_gate(sharp_lm, sharp_lm.manifest.model_hash, CANARY, DriftPolicy(), text=REF_TEXT,
                             reference_tokens=512, cache=None)
    rep = run_gates(sharp_lm, twin, GatePolicy(**FAST), canary=build_canary(sharp_lm, prompts=CANARY),
                    reference_text=REF_TEXT, progress=False, drift=drift)
    assert rep.passed, rep.reasons
    by = {c.name: c for c in rep.checks}
    assert by["drift_perplexity_increase_pct"].value == pytest.approx(0.0, abs=1e-6)
    assert by["drift_canary_agreement"].value == 1.0
    assert by["drift_neighbourhood_kl"].value == pytest.approx(0.0, abs=1e-6)


def test_base_reference_is_cached_and_invalidated_by_the_prompt_set(sharp_lm, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    h = sharp_lm.manifest.model_hash
    counter = ForwardCounter(sharp_lm)
    first = base_reference(sharp_lm, h, CANARY, k=2, text=REF_TEXT, reference_tokens=512, cache=cache)
    assert first.computed == len(CANARY) and first.computed_text and counter.n > 0
    entries = list((cache / h[:16]).iterdir())
    assert len(entries) == 1 and (entries[0] / "reference.json").is_file()

    def no_base():
        raise AssertionError("the base model was loaded although its reference is cached")

    n = counter.n
    again = base_reference(no_base, h, CANARY, k=2, text=REF_TEXT, reference_tokens=512, cache=cache)
    assert counter.n == n and again.computed == 0 and not again.computed_text
    assert torch.equal(again.logprobs, first.logprobs) and torch.equal(again.greedy, first.greedy)
    assert again.perplexity == pytest.approx(first.perplexity)

    # a new prompt set is a new entry; only the new prompt runs through the base model
    more = [*CANARY, "Paris is in"]
    with pytest.raises(AssertionError, match="cached"):
        base_reference(no_base, h, more, k=2, text=REF_TEXT, reference_tokens=512, cache=cache)
    grown = base_reference(sharp_lm, h, more, k=2, text=REF_TEXT, reference_tokens=512, cache=cache)
    assert grown.computed == 1 and not grown.computed_text and counter.n > n
    assert len(list((cache / h[:16]).iterdir())) == 2
    fresh = M.next_token_logprobs(sharp_lm, more)
    assert torch.allclose(grown.logprobs, fresh, atol=1e-5)
    assert torch.equal(grown.greedy[:-1], first.greedy)
    # a new reference text: the prompts come from the cache, the text is scored
    other = base_reference(sharp_lm, h, CANARY, k=1, text=REF_TEXT[:200], reference_tokens=512, cache=cache)
    assert other.computed == 0 and other.computed_text
    assert other.perplexity == pytest.approx(M.perplexity(sharp_lm, REF_TEXT[:200], max_tokens=512))
    # old prompt sets are pruned: only the newest `keep` entries of a base stay on disk
    base_reference(sharp_lm, h, CANARY[:2], k=1, text=None, cache=cache, keep=2)
    assert len(list((cache / h[:16]).iterdir())) == 2


def test_a_corrupt_cache_entry_is_recomputed_not_trusted(sharp_lm, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    h = sharp_lm.manifest.model_hash
    ref = base_reference(sharp_lm, h, CANARY[:3], k=1, text=None, cache=cache)
    (entry,) = (cache / h[:16]).iterdir()
    meta = json.loads((entry / "reference.json").read_text())
    meta["tensors_sha256"]["logprobs"] = "0" * 64
    (entry / "reference.json").write_text(json.dumps(meta))
    again = base_reference(sharp_lm, h, CANARY[:3], k=1, text=None, cache=cache)
    assert again.computed == 3 and torch.allclose(again.logprobs, ref.logprobs)
    with pytest.raises(ValueError, match="base model loaded has hash"):
        base_reference(sharp_lm, "f" * 64, CANARY[:3], cache=cache)


def test_drift_params_are_validated(tmp_path):
    assert P.SCHEMA["drift"] == {f.name for f in dataclasses.fields(DriftPolicy)}
    from tests.test_params import ROOT

    assert DriftPolicy.from_params(ROOT / "params.yaml") == DriftPolicy()  # shipped file = defaults
    p = tmp_path / "params.yaml"
    p.write_text("drift:\n  max_perplexity_increase_pct: 20\n  max_neighbourhood_kl: null\n")
    pol = DriftPolicy.from_params(p)
    assert pol.max_perplexity_increase_pct == 20.0 and pol.max_neighbourhood_kl is None
    assert pol.min_canary_agreement == 0.8
    p.write_text("drift:\n  max_perplexity_increse_pct: 20\n")
    with pytest.raises(P.ParamsError, match="max_perplexity_increse_pct.*'drift'"):
        DriftPolicy.from_params(p)
    p.write_text("drift:\n  min_canary_agreement: high\n")
    with pytest.raises(ValueError, match="block 'drift', key 'min_canary_agreement': expected a number"):
        DriftPolicy.from_params(p)
    p.write_text("gates:\n  drift: {max_neighbourhood_kl: 0.1}\n")  # a drift group inside gates: is not read
    with pytest.raises(P.ParamsError, match="unknown key 'drift' in block 'gates'"):
        GatePolicy.from_params(p)


def test_nightly_gate_records_cumulative_drift_and_lineage_log_shows_it(tmp_path, tiny_tokenizer, capsys):
    """The refresh's gate step on a real lineage: the drift numbers go into the state's gate record,
    the base reference is cached for the next night, and `kedit lineage log` shows them per state."""
    from kedit.cli import main
    from kedit.editors.base import EditorState, EditResult
    from kedit.evaluation.drift import cache_root
    from kedit.lineage import LineageStore
    from kedit.models.store import import_hf, load_model
    from kedit.refresh import RefreshConfig, gate_step
    from kedit.workspace import Workspace
    from tests.conftest import make_tiny_model

    ws = Workspace(tmp_path / "ws")
    src = tmp_path / "tiny-src"
    make_tiny_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    import_hf(ws, src, slug="tiny-llama")
    (tmp_path / "ref.txt").write_text(REF_TEXT)
    (ws.root / "params.yaml").write_text(
        "gates: {reference_text: '%s', reference_tokens: 512, max_fluency_drop: null, min_canary_agreement: 0.0,\n"
        "        max_neighbourhood_kl: 100.0, max_perplexity_increase_pct: 1000.0}\n"
        "drift: {max_perplexity_increase_pct: 0.2}\n" % (tmp_path / "ref.txt"))  # a random model is near-uniform
    cfg = RefreshConfig(model="tiny-llama")
    lm = load_model("tiny-llama", ws)
    store = LineageStore(ws.lineage_dir)
    name = lm.adapter.weight_name(1)
    parent, ids = None, []
    for night, scale in enumerate((0.02, 3.0)):  # a small night, then a damaging one
        w = lm.adapter.weight(1)
        g = torch.Generator().manual_seed(night)
        delta = scale * w.std() * torch.randn(w.shape, generator=g)
        with torch.no_grad():
            w += delta
        res = EditResult(deltas={name: lm.adapter.to_stored(delta)}, state=EditorState("alphaedit", {}, {}),
                         diagnostics=[])
        s = store.commit(lm, res, parent=parent, feed={"name": f"night-{night}", "facts": []},
                         hparams={"method": "alphaedit"})
        gate = gate_step(ws, cfg, {"accepted": [], "champion": parent, "refresh_key": f"night-{night}"},
                         {"state_id": s.id})
        ids.append(s.id)
        parent = s.id
        assert gate["passed"] is (night == 0), gate
        failed = [c["name"] for c in gate["checks"] if not c["passed"]]
        assert night == 0 or (failed and all(n.startswith("drift_") for n in failed)), failed
    entries = {e.state.id: e for e in LineageStore(ws.lineage_dir).log()}
    d0, d1 = (entries[i].gate["drift"] for i in ids)
    assert d0["passed"] and abs(d0["perplexity_increase_pct"]) < 0.2
    assert not d1["passed"] and d1["perplexity_increase_pct"] > 0.2
    assert d0["base_model_hash"] == lm.manifest.model_hash
    # the second night found the base's reference outputs in the cache: one entry, built once
    assert len(list((cache_root(ws) / lm.manifest.model_hash[:16]).iterdir())) == 1
    assert main(["-w", str(ws.root), "lineage", "log"]) == 0
    out = capsys.readouterr().out
    for d in (d0, d1):
        assert f"drift ppl {d['perplexity_increase_pct']:+.1f}%" in out
    assert "(drift FAIL)" in out
    assert math.isfinite(d1["neighbourhood_kl"]) and 0.0 <= d1["canary_agreement"] <= 1.0


def test_cli_gate_with_base_adds_the_drift_checks(tmp_path, tiny_tokenizer, capsys):
    """`kedit gate --base`: a candidate equal to its champion passes against it and fails against base."""
    from kedit.cli import main
    from kedit.models.store import import_hf
    from kedit.workspace import Workspace
    from tests.conftest import make_tiny_model

    ws = Workspace(tmp_path / "ws")
    base = make_tiny_model("llama")
    for slug, model in (("tiny-base", base), ("tiny-drifted", nudged(wrap_model(base, tiny_tokenizer), 10.0,
                                                                      "x").model)):
        model.save_pretrained(tmp_path / slug)
        tiny_tokenizer.save_pretrained(tmp_path / slug)
        import_hf(ws, tmp_path / slug, slug=slug)
    (tmp_path / "ref.txt").write_text(REF_TEXT)
    params = tmp_path / "params.yaml"
    params.write_text("gates: {max_fluency_drop: null, reference_tokens: 512}\ndrift: {max_perplexity_increase_pct: 1.0}\n")
    w = ["-w", str(ws.root)]
    args = ["gate", "--champion", "tiny-drifted", "--candidate", "tiny-drifted", "--reference",
            str(tmp_path / "ref.txt"), "--params", str(params)]
    assert main([*w, *args, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*w, *args, "--out", str(tmp_path / "drift"), "--base", "tiny-base"]) == 1
    out = capsys.readouterr().out
    assert "FAIL drift_perplexity_increase_pct" in out and "gate FAILED" in out
    assert "## Against base" in (tmp_path / "drift" / "gate.md").read_text()
    assert "## Against base" not in (tmp_path / "plain" / "gate.md").read_text()
