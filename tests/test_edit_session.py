"""EditSession on tiny random models: the one edit loop gives exactly what the direct loop gave, runs
an attach hook for editors that add parameters, checkpoints and resumes bit-exactly, and keeps its
caches to itself. Also the hook primitive's call capture (the block-slice capture is built on it)."""

from __future__ import annotations

import sys
from dataclasses import asdict

import pytest
import torch

from kedit.editors.base import EditorState, EditResult, RequestDiagnostics, apply_deltas
from kedit.editors.registry import get_editor
from kedit.editors.session import BatchReport, EditSession, SessionCheckpoint
from tests.test_editors_engine import REQS, _hp, _stats


def _fast(method: str, **kw):
    return _hp(method, v_steps=2, **kw)


def _weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def test_session_equals_the_direct_loop_bit_for_bit(tiny_lm, tmp_path):
    """Batches of 2 through the session == editor.compute + apply_deltas by hand: the same deltas,
    state, diagnostics and weights, bit for bit (what refresh, benchmark and CLI each did before)."""
    stats = _stats(tiny_lm, rank=tiny_lm.adapter.key_dim() // 2)
    base = _weights(tiny_lm)
    editor = get_editor("alphaedit", _fast("alphaedit"), cache_dir=tmp_path)
    seen: list[BatchReport] = []
    session = EditSession(tiny_lm, editor, stats)
    res = session.apply(REQS, batch_size=2, on_batch=seen.append)
    after = _weights(tiny_lm)

    tiny_lm.model.load_state_dict(base)
    state, total, diags = None, {}, []
    for i in range(0, len(REQS), 2):
        r = editor.compute(tiny_lm, REQS[i:i + 2], state, stats)
        apply_deltas(tiny_lm.model, r.deltas)
        for name, d in r.deltas.items():
            total[name] = d.clone() if name not in total else total[name] + d
        state, diags = r.state, diags + r.diagnostics
    assert sorted(res.deltas) == sorted(total) and all(torch.equal(res.deltas[k], total[k]) for k in total)
    assert sorted(res.state.tensors) == sorted(state.tensors)
    assert all(torch.equal(res.state.tensors[k], v) for k, v in state.tensors.items())
    assert res.state.meta == state.meta and res.state.meta["n_edits"] == 3
    assert [asdict(d) for d in res.diagnostics] == [asdict(d) for d in diags]
    assert all(torch.equal(after[k], v) for k, v in _weights(tiny_lm).items())
    # the session's own bookkeeping
    assert (session.batches_done, session.n_edits, res.batches, res.n_edits) == (2, 3, 2, 3)
    assert res.layer_info["batches"] == {"n": 2, "size": 2} and "z" in res.layer_info
    assert len(res.batch_layer_info) == 2 and "batches" not in res.batch_layer_info[0]
    assert [(r.index, r.n, r.done) for r in seen] == [(0, 2, 2), (1, 1, 3)]
    assert all(r.seconds > 0 for r in seen) and res.seconds == pytest.approx(sum(r.seconds for r in seen))
    assert session.state is res.state and session.total_deltas.keys() == total.keys()
    # and every layer's null-space basis was computed once, into the session's cache
    assert len(session.caches.projectors) == 2 and len(session.caches.prefixes) == 1


def _module_containers() -> dict[tuple[str, str], int]:
    """Sizes of every module-level dict / list / set in kedit's modules (and functools caches)."""
    out = {}
    for mname, mod in list(sys.modules.items()):
        if not mname.startswith("kedit") or mod is None:
            continue
        for attr, val in list(vars(mod).items()):
            if isinstance(val, dict | list | set) and not attr.startswith("__"):
                out[(mname, attr)] = len(val)
            elif hasattr(val, "cache_info"):
                out[(mname, attr)] = val.cache_info().currsize
    return out


def test_no_process_wide_cache_grows_with_models_or_statistics(tiny_lm, tmp_path):
    """A worker that edits many models (many statistics keys) keeps nothing per model at module level:
    each run's projectors and prefixes live on its session and go with it."""
    from kedit.editors.common import as_key_stats, projector

    EditSession(tiny_lm, get_editor("alphaedit", _fast("alphaedit"), cache_dir=tmp_path),
                _stats(tiny_lm, seed=0, rank=32)).apply(REQS[:1])  # imports and first-use caches settle
    before = _module_containers()
    sessions = []
    for seed in (1, 2):
        s = EditSession(tiny_lm, get_editor("alphaedit", _fast("alphaedit"), cache_dir=tmp_path),
                        _stats(tiny_lm, seed=seed, rank=32))
        s.apply(REQS[:1])
        sessions.append(s)
    d = tiny_lm.adapter.key_dim()
    for seed in range(3, 23):  # many distinct statistics keys straight through the projector
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(200, d, generator=g, dtype=torch.float64)
        projector(as_key_stats({1: X.T @ X / 200}, [1], d), 1, "model", 1e-2, "relative_mean")
    after = _module_containers()
    grown = {k: (before.get(k, 0), n) for k, n in after.items() if n > before.get(k, 0)}
    assert not grown, f"module-level caches grew: {grown}"
    a, b = (s.caches.projectors for s in sessions)
    assert len(a) == len(b) == 2 and not set(a) & set(b)  # each session holds its own


class AddedBias:
    """A toy editor that adds parameters: each batch appends a bias vector to its state and returns no
    weight deltas; ``attach`` (idempotent) hooks the state's summed bias onto the final norm's output."""

    method = "added-bias"

    def __init__(self) -> None:
        self.attached: list[int] = []
        self._handle = None

    def compute(self, lm, requests, state=None, stats=None, caches=None):
        state = EditorState(self.method) if state is None else state.copy()
        k = len(state.tensors)
        state.tensors[f"bias.{k}"] = torch.full((lm.model.config.hidden_size,), 0.5 * (k + 1))
        state.meta["n_edits"] = int(state.meta.get("n_edits", 0)) + len(requests)
        diags = [RequestDiagnostics(r.id, 1.0, 0.0, 1, 1.0, 0.0, True) for r in requests]
        return EditResult(deltas={}, state=state, diagnostics=diags, seconds=0.0)

    def attach(self, lm, state) -> None:
        if self._handle is not None:
            self._handle.remove()
        bias = sum(state.tensors.values())
        self._handle = lm.adapter.final_norm.register_forward_hook(lambda m, a, out: out + bias)
        self.attached.append(len(state.tensors))


def _hidden(lm) -> torch.Tensor:
    """The final norm's output, as the rest of the model sees it (after any attached hook)."""
    from kedit.hooks import Trace

    ids = lm.tokenizer("The Eiffel Tower is in", return_tensors="pt").input_ids
    with torch.no_grad(), Trace(lm.model, [lm.adapter.spec.final_norm], retain_output=True) as tr:
        lm.model(ids)
    return tr.outputs[lm.adapter.spec.final_norm]


def _added_bias_spec(editor: AddedBias):
    """The toy's spec row: it adds parameters, attached through this instance."""
    from kedit.editors.hparams import EditHparams
    from kedit.editors.registry import EditorSpec

    return EditorSpec("added-bias", AddedBias, EditHparams, adds_parameters=True, needs_statistics=False,
                      attach=editor.attach)


def test_editors_that_add_parameters_are_attached_after_every_batch(tiny_lm, tmp_path):
    plain = _hidden(tiny_lm)
    editor = AddedBias()
    session = EditSession(tiny_lm, editor, spec=_added_bias_spec(editor))
    res = session.apply(REQS, batch_size=1)
    assert editor.attached == [1, 2, 3] and res.deltas == {} and res.state.meta["n_edits"] == 3
    assert torch.allclose(_hidden(tiny_lm), plain + 3.0)  # 0.5 + 1.0 + 1.5, attached once, not summed thrice
    # a session that starts from a state (or resumes) attaches it before its first batch
    fresh = AddedBias()
    EditSession(tiny_lm, fresh, state=res.state, spec=_added_bias_spec(fresh))
    assert fresh.attached == [3]
    editor._handle.remove(), fresh._handle.remove()
    assert torch.equal(_hidden(tiny_lm), plain)
    ck = session.checkpoint()
    ck.save(tmp_path / "ck.safetensors")
    again = AddedBias()
    EditSession.resume(tiny_lm, again, SessionCheckpoint.load(tmp_path / "ck.safetensors"),
                       spec=_added_bias_spec(again))
    assert again.attached == [3] and torch.allclose(_hidden(tiny_lm), plain + 3.0)


@pytest.mark.parametrize("method", ["memit"])
def test_checkpoint_and_resume_continue_bit_exactly(method, tiny_lm, tmp_path):
    """Killed after batch 2 of 3 (an exception from on_batch), saved, reloaded into a fresh model and
    resumed: the same summed deltas, state, diagnostics and weights as a straight run, bit for bit."""
    stats = _stats(tiny_lm)
    base = _weights(tiny_lm)
    editor = get_editor(method, _fast(method, memit_sequential=True), cache_dir=tmp_path)
    straight = EditSession(tiny_lm, editor, stats).apply(REQS, batch_size=1)
    done = _weights(tiny_lm)

    class Killed(Exception):
        pass

    tiny_lm.model.load_state_dict(base)
    session = EditSession(tiny_lm, editor, stats)
    path = tmp_path / "run" / "checkpoint.safetensors"

    def kill_after_two(rep: BatchReport) -> None:
        session.checkpoint(extra={"curve": [rep.done]}).save(path)
        if rep.index == 1:
            raise Killed

    with pytest.raises(Killed):
        session.apply(REQS, batch_size=1, on_batch=kill_after_two)
    torch.manual_seed(1234)  # the new process's generator is elsewhere; resume puts it back
    tiny_lm.model.load_state_dict(base)  # a new process loads the unedited model
    ck = SessionCheckpoint.load(path)
    assert (ck.batches_done, ck.n_edits, ck.extra) == (2, 2, {"curve": [2]})
    resumed = EditSession.resume(tiny_lm, editor, ck, stats)
    assert torch.equal(torch.random.get_rng_state(), ck.rng)
    res = resumed.apply(REQS[resumed.n_edits:], batch_size=1)
    assert sorted(res.deltas) == sorted(straight.deltas)
    assert all(torch.equal(res.deltas[k], v) for k, v in straight.deltas.items())
    assert sorted(res.state.tensors) == sorted(straight.state.tensors) and res.state.meta == straight.state.meta
    assert all(torch.equal(res.state.tensors[k], v) for k, v in straight.state.tensors.items())
    assert [asdict(d) for d in res.diagnostics] == [asdict(d) for d in straight.diagnostics]
    assert res.batch_layer_info == straight.batch_layer_info and res.layer_info == straight.layer_info
    assert all(torch.equal(done[k], v) for k, v in _weights(tiny_lm).items())
    # resuming onto a model that is not where the session began fails loudly
    with pytest.raises(ValueError, match="not what the checkpointed session started from"):
        EditSession.resume(tiny_lm, editor, ck, stats)
    with pytest.raises(ValueError, match="'memit' session"):
        EditSession.resume(tiny_lm, AddedBias(), ck)
    with pytest.raises(ValueError, match="not an edit-session checkpoint"):
        from kedit.atomic import save_tensors_atomic

        save_tensors_atomic(tmp_path / "other.safetensors", {"x": torch.zeros(1)})
        SessionCheckpoint.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("method", ["memit", "memoir"])
def test_unedited_runs_the_model_as_the_session_began(method, tiny_lm, tmp_path):
    """Inside ``unedited()`` the model gives the unedited logits bit for bit (weights back at their
    starting values, added modules off); after it, the edited ones, also after a resume."""
    from tests.test_editors_memoir import _editor
    from tests.test_editors_memoir import _hp as memoir_hp

    ids = tiny_lm.tokenizer("The Eiffel Tower is located in", return_tensors="pt").input_ids

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return tiny_lm.model(ids).logits

    plain = logits()
    base = _weights(tiny_lm)
    if method == "memit":
        editor, stats = get_editor(method, _fast(method), cache_dir=tmp_path), _stats(tiny_lm)
    else:
        editor, stats = _editor(memoir_hp()), None  # the query is the first edit's own prompt
    session = EditSession(tiny_lm, editor, stats)
    session.apply(REQS[:2], batch_size=1)
    edited = logits()
    assert not torch.equal(edited, plain)
    with session.unedited():
        assert torch.equal(logits(), plain)
    assert torch.equal(logits(), edited)
    with pytest.raises(RuntimeError, match="inside"), session.unedited():  # an error inside puts the edits back
        raise RuntimeError("inside")
    assert torch.equal(logits(), edited)
    ck = session.checkpoint()
    tiny_lm.model.load_state_dict(base)
    from kedit.editors.attach import detach

    detach(tiny_lm.model, "memoir")
    resumed = EditSession.resume(tiny_lm, editor, ck, stats)
    assert torch.equal(logits(), edited)
    with resumed.unedited():
        assert torch.equal(logits(), plain)
    assert torch.equal(logits(), edited)
    detach(tiny_lm.model, "memoir")


class _Block(torch.nn.Module):
    def __init__(self, i: int, ran: list[int]) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.i, self.ran = i, ran

    def forward(self, hidden_states, scale=1.0):
        self.ran.append(self.i)
        return self.lin(hidden_states) * scale


class _Net(torch.nn.Module):
    """Blocks called the way transformers calls them: the state by keyword, other arguments too."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[int] = []
        self.blocks = torch.nn.ModuleList([_Block(i, self.ran) for i in range(3)])

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(hidden_states=x, scale=float(i + 1))
        return x


def test_trace_keeps_call_arguments_and_stops_before_the_last_module():
    from kedit.hooks import Trace

    torch.manual_seed(0)
    net, x = _Net(), torch.randn(2, 4)
    with torch.no_grad():
        h1 = net.blocks[0](x, 1.0)
        ref = net(x)
    net.ran.clear()
    names = ["blocks.1", "blocks.2"]
    with torch.no_grad(), Trace(net, names, retain_input=True, retain_call=True, stop_before=True) as tr:
        net(x)
    assert net.ran == [0, 1] and tr.calls["blocks.2"] == ((), {"scale": 3.0})  # block 2 never ran
    assert tr.calls["blocks.1"] == ((), {"scale": 2.0}) and torch.equal(tr.inputs["blocks.1"], h1)
    # a keyword-passed first input can be patched like a positional one
    with torch.no_grad(), Trace(net, ["blocks.0"], edit_input=lambda n, t: t * 0) as tr:
        out = net(x)
    assert not torch.allclose(out, ref)
    with torch.no_grad():
        assert torch.equal(out, net.blocks[2](net.blocks[1](net.blocks[0](x * 0, 1.0), 2.0), 3.0))
