"""`kedit export` of states that add parameters (T-Patcher, memory): the directory loads in a process
without kedit through transformers' remote code and computes what kedit's attached model computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kedit.lineage.store import LineageStore

pytestmark = pytest.mark.usefixtures("one_thread")

# loads the directory with transformers only: any attempt to import kedit fails, and none may have happened
LOADER = r"""
import importlib.abc, json, sys
class NoKedit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kedit" or name.startswith("kedit."):
            raise ImportError("kedit must not be needed to load an exported directory")
sys.meta_path.insert(0, NoKedit())
import torch
from transformers import AutoModelForCausalLM
d, job = sys.argv[1], json.load(open(sys.argv[2]))
try:  # without remote code the directory is refused, never silently loaded as the unedited base model
    AutoModelForCausalLM.from_pretrained(d)
    raise SystemExit("loaded without trust_remote_code")
except ValueError as e:
    assert "trust_remote_code" in str(e), e
m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
out = {"class": type(m).__name__, "mro": [c.__name__ for c in type(m).__mro__], "logits": []}
with torch.no_grad():
    for ids in job["prompts"]:
        out["logits"].append(m(input_ids=torch.tensor([ids])).logits[0].tolist())
    g = m.generate(torch.tensor([job["prompts"][0]]), max_new_tokens=6, do_sample=False)
out["generated"] = g[0].tolist()
assert not any(k == "kedit" or k.startswith("kedit.") for k in sys.modules), "kedit was imported"
json.dump(out, open(sys.argv[3], "w"))
"""


def _load_elsewhere(d, prompts, tmp_path) -> dict:
    job, res, script = tmp_path / "job.json", tmp_path / "res.json", tmp_path / "load.py"
    job.write_text(json.dumps({"prompts": prompts}))
    script.write_text(LOADER)
    # -I: no PYTHONPATH, no user site, no current directory on the path (so no kedit sources)
    r = subprocess.run([sys.executable, "-I", str(script), str(d), str(job), str(res)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(res.read_text())


@pytest.fixture
def export_and_compare(feed_record, greedy_predictions):
    """``export_and_compare(workspace, lm, res, prompts, tmp_path, capsys)``: commit ``res`` as a lineage
    state, export it with the CLI, and compare a kedit-free load with kedit's attached model on every
    prompt (logits and greedy generation)."""
    return lambda *args: _export_and_compare(*args, feed_record, greedy_predictions)


def _export_and_compare(workspace, lm, res, prompts, tmp_path, capsys, feed, predict):
    from kedit.cli import main
    from kedit.editors.registry import attach_state

    store = LineageStore(workspace.lineage_dir)
    s = store.commit(lm, res, parent=None, feed=feed(0), hparams={"method": res.state.method},
                     evaluation={}, predictions=predict(lm))
    out = tmp_path / "served"
    assert main(["-w", str(workspace.root), "export", s.id[:10], "--out", str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    shipped = {p.name for p in out.glob("*.py")}
    assert shipped == {"configuration_kedit_added.py", "modeling_kedit_added.py"}
    for p in out.glob("*.py"):
        assert "import kedit" not in p.read_text() and "from kedit" not in p.read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_kedit_added.KeditAddedForCausalLM"
    assert cfg["kedit_added"]["method"] == res.state.method

    ids = [lm.tokenizer(p).input_ids for p in prompts]
    got = _load_elsewhere(out, ids, tmp_path)
    assert "LlamaForCausalLM" in got["mro"]
    attach_state(lm, res.state)
    with torch.no_grad():
        want = [lm.model(input_ids=torch.tensor([i])).logits[0] for i in ids]
        gen = lm.model.generate(torch.tensor([ids[0]]), max_new_tokens=6, do_sample=False)
    for w, g in zip(want, got["logits"]):
        torch.testing.assert_close(torch.tensor(g), w, atol=1e-5, rtol=1e-5)
    assert got["generated"] == gen[0].tolist() and len(got["generated"]) > len(ids[0])
    attach_state(lm, None)
    with torch.no_grad():
        base = lm.model(input_ids=torch.tensor([ids[0]])).logits[0]
    assert (base - want[0]).abs().max() > 1e-3  # the edit changes the edited prompt: the hook matters
    return out, got, base


def test_tpatcher_state_exports_with_its_patches(workspace, stored_lm, tmp_path, capsys, tpatcher,
                                                 export_and_compare):
    lm = stored_lm()
    res = tpatcher.compute(lm, tmp_path, reqs=tpatcher.reqs[:1])
    export_and_compare(workspace, lm, res, [tpatcher.probes[0], tpatcher.probes[2]], tmp_path, capsys)


def test_memoir_state_exports_with_its_memory(workspace, stored_lm, tmp_path, capsys, export_and_compare,
                                              memoir):
    lm = stored_lm()
    res = memoir.editor(memoir.hp(n_prefixes=2, prefix_len=3)).compute(lm, [memoir.req(memoir.a)], None, None)
    # the prompt reads its entry through the exact key alone: the shipped code must match exact keys too
    res.state.meta["threshold"] = 1.0
    # the shipped code adds the same share of the entry's block: here the exact key's share
    res.state.meta.update(read_scale=0.75, exact_read_scale=0.5)
    no_exact = res.state.copy()
    del no_exact.tensors["mm.exact"], no_exact.meta["exact_threshold"]
    assert memoir.fires(lm, no_exact, memoir.a["prompt"].format(memoir.a["subject"])).tokens.numel() == 0
    out, got, _ = export_and_compare(workspace, lm, res, [memoir.a["prompt"].format(memoir.a["subject"]),
                                                          memoir.other], tmp_path, capsys)
    spec = json.loads((out / "config.json").read_text())["kedit_added"]
    assert spec["exact_threshold"] == 0.95 and spec["read_scale"] == 0.75 and spec["exact_read_scale"] == 0.5
    # text that matches no stored mask runs the base model exactly
    from kedit.editors.registry import attach_state

    attach_state(lm, None)
    with torch.no_grad():
        base_other = lm.model(input_ids=torch.tensor([lm.tokenizer(memoir.other).input_ids])).logits[0]
    torch.testing.assert_close(torch.tensor(got["logits"][1]), base_other, atol=1e-5, rtol=1e-5)


def test_memoir_span_keys_export_and_decode_as_in_kedit(workspace, stored_lm, tmp_path, capsys,
                                                        export_and_compare, memoir):
    """A subject of several tokens read through its mask and span key: the shipped code guards the entry
    the same way, in a full forward and in cached greedy decoding (the token before a decoded token is
    the previous call's last one)."""

    lm = stored_lm()
    res = memoir.editor(memoir.hp(mm_threshold=0.5)).compute(lm, [memoir.req(memoir.b)], None, None)
    del res.state.tensors["mm.exact"], res.state.meta["exact_threshold"]
    text = memoir.b["prompt"].format(memoir.b["subject"])
    assert bool(res.state.tensors["mm.span_on"][0]) and memoir.fires(lm, res.state, text).tokens.numel() == 1
    out, _, _ = export_and_compare(workspace, lm, res, [text, memoir.other], tmp_path, capsys)
    assert json.loads((out / "config.json").read_text())["kedit_added"]["span_threshold"] == 0.3


def test_states_that_add_nothing_export_plain_and_other_architectures_get_their_own_base_class(
        tiny_tokenizer, tmp_path, tiny_model_factory):
    """Pure parts: no added tensors -> no remote code; the shipped class subclasses the model's own
    architecture (GPT-2 here), and its hook equals kedit's attached one (random patches that fire)."""
    from transformers import AutoModelForCausalLM

    from kedit.editors import tpatcher as T
    from kedit.editors.base import EditorState
    from kedit.editors.registry import attach_state
    from kedit.export import added_parameters, save_with_added
    from kedit.models.store import wrap_model

    lm = wrap_model(tiny_model_factory("gpt2"), tiny_tokenizer, slug="tiny-gpt2")
    assert added_parameters(lm, None) is None
    assert added_parameters(lm, EditorState("alphaedit", {"cache_c.1": torch.zeros(2, 2)})) is None
    assert added_parameters(lm, EditorState("tpatcher", {}, {"layer": 1})) is None
    g = torch.Generator().manual_seed(0)
    d, d_out = lm.model.config.n_embd, lm.model.config.n_embd
    state = EditorState("tpatcher", {T.KEY: torch.randn(3, d, generator=g), T.BIAS: torch.randn(3, generator=g),
                                     T.VALUE: torch.randn(3, d_out, generator=g)}, {"layer": 1})
    added = added_parameters(lm, state)
    assert added.spec["module"] == lm.adapter.mlp_name(1)
    save_with_added(lm, added, tmp_path / "gpt2")
    assert 'BASE_MODEL_CLASS = "GPT2LMHeadModel"' in (tmp_path / "gpt2" / "modeling_kedit_added.py").read_text()
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", trust_remote_code=True).eval()
    assert isinstance(served, type(lm.model))
    ids = torch.tensor([lm.tokenizer("The quick brown fox jumps").input_ids])
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        attach_state(lm, state)
        want = lm.model(input_ids=ids).logits
        got = served(input_ids=ids).logits
    attach_state(lm, None)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_gemma3_memory_exports_with_its_change_added_after_the_post_feedforward_norm(
        tiny_tokenizer, tmp_path, tiny_model_factory, memoir):
    """Gemma 3 (a norm between the MLP and the residual stream): the shipped code reads the memory at
    the down-projection and adds its change after ``post_feedforward_layernorm``, as kedit does; the
    loaded class is Gemma's own, and its logits and greedy tokens equal kedit's attached model's."""
    from transformers import AutoModelForCausalLM

    from kedit.editors.registry import attach_state
    from kedit.export import added_parameters, save_with_added
    from kedit.models.store import wrap_model

    lm = wrap_model(tiny_model_factory("gemma3_text"), tiny_tokenizer, slug="tiny-gemma3")
    state = memoir.editor().compute(lm, [memoir.req(memoir.a)], None, None).state
    layer = int(state.meta["layer"])
    added = added_parameters(lm, state)
    assert added.spec["module"] == lm.adapter.mlp_out_name(layer)
    assert added.spec["add_module"] == f"{lm.adapter.layer_name(layer)}.post_feedforward_layernorm"
    save_with_added(lm, added, tmp_path / "gemma")
    assert 'BASE_MODEL_CLASS = "Gemma3ForCausalLM"' in (tmp_path / "gemma" / "modeling_kedit_added.py").read_text()
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma", trust_remote_code=True).eval()
    prompt = lm.tokenizer(memoir.a["prompt"].format(memoir.a["subject"]), return_tensors="pt").input_ids
    other = lm.tokenizer(memoir.other, return_tensors="pt").input_ids
    with torch.no_grad():
        base = lm.model(input_ids=prompt).logits
        attach_state(lm, state)
        want, want_other = lm.model(input_ids=prompt).logits, lm.model(input_ids=other).logits
        want_gen = lm.model.generate(prompt, max_new_tokens=6, do_sample=False)
        got, got_other = served(input_ids=prompt).logits, served(input_ids=other).logits
        got_gen = served.generate(prompt, max_new_tokens=6, do_sample=False)
    attach_state(lm, None)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_other, want_other, atol=1e-5, rtol=1e-5)
    assert got_gen.tolist() == want_gen.tolist()
