"""The editor contract: every registered method is an :class:`Editor` with one spec row, the session
does what the spec says (not what the editor object happens to have), settings are checked per
method with errors that name the method, key and value, and the settings' hash ignores notes."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from kedit.editors.base import Editor, EditorState, EditRequest, EditResult, RequestDiagnostics
from kedit.editors.hparams import (
    METHODS,
    EditHparams,
    MemoirHparams,
    TPatcherHparams,
    WeightEditHparams,
    hparams_digest,
    hparams_type,
    load_hparams,
)
from kedit.editors.registry import SPECS, EditorSpec, get_editor, spec
from kedit.editors.session import EditSession

REQS = [EditRequest("{} is located in", "The Eiffel Tower", "Rome", id="a"),
        EditRequest("{} speaks", "Danielle Darrieux", "English", id="b")]


@pytest.mark.parametrize("method", METHODS)
def test_every_registered_method_satisfies_the_protocol(method):
    assert tuple(SPECS) == METHODS
    s = spec(method)
    assert s.name == method and s.hparams is hparams_type(method)
    hp = load_hparams(method)
    assert isinstance(hp, s.hparams) and type(EditHparams(method=method)) is s.hparams
    editor = get_editor(method, hp)
    assert isinstance(editor, Editor) and isinstance(editor, s.editor) and editor.method == method
    # compute takes the session's call: (lm, requests, state, stats, caches=...)
    inspect.signature(editor.compute).bind(None, [], None, None, caches=None)
    # added parameters and statistics are exclusive ways of working; retraction needs added rows
    assert s.adds_parameters == (s.attach is not None) == (not s.needs_statistics)
    assert not s.retractable or s.adds_parameters
    assert s.writes_vstar == (method != "tpatcher")


def test_spec_rows_are_checked():
    with pytest.raises(ValueError, match="adds parameters needs attach"):
        EditorSpec("x", object, EditHparams, adds_parameters=True)
    with pytest.raises(ValueError, match="retract and owners go together"):
        EditorSpec("x", object, EditHparams, adds_parameters=True, attach=lambda lm, s: None,
                   retract=lambda s, f: s)
    with pytest.raises(ValueError, match="unknown edit method 'nope'"):
        spec("nope")


class Recorder:
    """A toy editor that adds a counter to its state and has ``attach`` / ``upgrade`` methods of its own:
    the session must call what the spec names, not these."""

    method = "recorder"

    def __init__(self) -> None:
        self.hp = TPatcherHparams()
        self.own_calls: list[str] = []
        self.caches_seen: list[object] = []

    def compute(self, lm, requests, state=None, stats=None, caches=None):
        self.caches_seen.append(caches)
        state = EditorState(self.method) if state is None else state.copy()
        state.meta["n"] = int(state.meta.get("n", 0)) + len(requests)
        diags = [RequestDiagnostics(r.id, 1.0, 0.0, 1, 1.0, 0.0, True) for r in requests]
        return EditResult(deltas={}, state=state, diagnostics=diags)

    def attach(self, lm, state) -> None:
        self.own_calls.append("attach")

    def upgrade(self, lm, state, applied):
        self.own_calls.append("upgrade")
        return state


def test_spec_fields_drive_the_session(tiny_lm, tmp_path):
    attached, upgraded = [], []

    def attach(lm, state):
        attached.append(state.meta["n"])

    def upgrade(editor, lm, state, applied):
        upgraded.append([r.id for r in applied])
        return EditorState(state.method, dict(state.tensors), {**state.meta, "upgraded": True})

    editor = Recorder()
    plain = EditorSpec("recorder", Recorder, TPatcherHparams)  # adds nothing: attach / upgrade never called
    session = EditSession(tiny_lm, editor, spec=plain)
    session.apply(REQS, batch_size=1)
    assert editor.own_calls == [] and editor.caches_seen == [session.caches, session.caches]
    resumed = EditSession.resume(tiny_lm, editor, session.checkpoint(), applied=REQS, spec=plain)
    assert editor.own_calls == [] and "upgraded" not in resumed.state.meta

    adding = EditorSpec("recorder", Recorder, TPatcherHparams, adds_parameters=True, needs_statistics=False,
                        attach=attach, upgrade=upgrade)
    session = EditSession(tiny_lm, editor, spec=adding)
    session.apply(REQS, batch_size=1)
    assert attached == [1, 2] and editor.own_calls == []
    resumed = EditSession.resume(tiny_lm, editor, session.checkpoint(), applied=REQS, spec=adding)
    assert upgraded == [["a", "b"]] and resumed.state.meta["upgraded"] and attached == [1, 2, 2]
    # an editor no spec row names is refused, not guessed at
    with pytest.raises(ValueError, match="no spec row"):
        EditSession(tiny_lm, Recorder())


def test_prepare_edit_reads_statistics_only_where_the_spec_asks(tiny_lm, workspace):
    from kedit.editors.memoir import memory_layer
    from kedit.editors.setup import prepare_edit

    setup = prepare_edit(tiny_lm, "memoir", workspace, overrides={"layers": [1, 2], "n_prefixes": 0})
    assert setup.stats is None and not setup.spec.needs_statistics
    assert setup.layers == [memory_layer(setup.hp, tiny_lm.adapter.num_layers)] == [2]
    assert isinstance(setup.hp, MemoirHparams) and setup.editor.method == "memoir"

    setup = prepare_edit(tiny_lm, "memit", workspace, overrides={"layers": [1, 2], "n_prefixes": 0},
                         stats_tokens=256, stats_seq_len=32, stats_progress=False)
    assert setup.spec.needs_statistics and setup.layers == [1, 2] and sorted(setup.stats.mom2) == [1, 2]
    assert isinstance(setup.editor, spec("memit").editor)


def test_hparams_errors_name_the_method_key_and_value(tmp_path):
    with pytest.raises(ValueError, match=r"mm_threshold must be in \(0, 1\], not 1.5 \(method memoir\)"):
        EditHparams(method="memoir", mm_threshold=1.5)
    with pytest.raises(ValueError, match=r"tp_steps must be positive, not -2 \(method tpatcher\)"):
        TPatcherHparams(tp_steps=-2)
    with pytest.raises(ValueError, match="v_stop must be nll or most_probable, not 'always' \\(method rome\\)"):
        WeightEditHparams(method="rome", v_stop="always")
    with pytest.raises(ValueError, match="WeightEditHparams holds no memoir settings"):
        WeightEditHparams(method="memoir")
    # a method's block (and an override) may set only that method's keys
    f = tmp_path / "hp.yaml"
    f.write_text("defaults:\n  v_lr: 0.3\n  L2: 4\nmemoir:\n  L2: 3\n")
    with pytest.raises(ValueError, match=r"block 'memoir' sets \['L2'\], which memoir does not read"):
        load_hparams("memoir", path=f)
    f.write_text("defaults:\n  v_lr: 0.3\n  L2: 4\nmemoir:\n  mm_k: 8\n")
    # the defaults block is shared: each method takes its own keys from it
    assert load_hparams("alphaedit", path=f).L2 == 4 and load_hparams("memoir", path=f).v_lr == 0.3
    with pytest.raises(ValueError, match=r"override L2=5: memoir does not read 'L2'"):
        load_hparams("memoir", path=f, overrides={"L2": 5})
    f.write_text("memoir:\n  mm_k: lots\n")
    with pytest.raises(ValueError, match=r"mm_k must be a number, got 'lots' \(method memoir\)"):
        load_hparams("memoir", path=f)
    f.write_text("tpatcher:\n  tp_lr: 0\n")
    with pytest.raises(ValueError, match=rf"\({f}\): tp_lr must be positive, not 0.0 \(method tpatcher\)"):
        load_hparams("tpatcher", path=f)


def test_hparams_hash_ignores_notes_and_follows_values(tmp_path):
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text("defaults:\n  v_lr: 0.3\nmemoir:\n  mm_k: 32\n  why:\n    mm_k: measured on dev 0-99\n")
    b.write_text("defaults:\n  v_lr: 0.3\n  why:\n    v_lr: another note\nmemoir:\n  mm_k: 32\n  why:\n"
                 "    mm_k: re-measured, same value\n")
    c.write_text("defaults:\n  v_lr: 0.3\nmemoir:\n  mm_k: 33\n  why:\n    mm_k: measured on dev 0-99\n")
    ha, hb, hc = (load_hparams("memoir", path=p) for p in (a, b, c))
    assert ha.notes != hb.notes and ha.source_sha256 != hb.source_sha256
    assert ha.digest() == hb.digest() == hparams_digest("memoir", path=b)
    assert ha.digest() != hc.digest()
    assert ha.digest() != load_hparams("memoir", path=a, overrides={"mm_k": 16}).digest()
    # a value written out equal to the default is the same settings as leaving it out
    assert load_hparams("memoir", path=a, overrides={"mm_threshold": 0.5}).digest() == ha.digest()


def test_refresh_key_hashes_resolved_settings():
    from kedit.refresh import RefreshConfig, refresh_key

    mm_k = load_hparams("memoir", "smollm2-135m").mm_k
    key = refresh_key("f" * 64, None, RefreshConfig(method="memoir", model="smollm2-135m"))
    assert key == refresh_key("f" * 64, None, RefreshConfig(method="memoir", model="smollm2-135m",
                                                            hparams_overrides={"mm_k": mm_k}))
    assert key != refresh_key("f" * 64, None, RefreshConfig(method="memoir", model="smollm2-135m",
                                                            hparams_overrides={"mm_k": mm_k // 2}))


def test_no_caller_branches_on_a_method_name():
    """Outside the editors package, code asks a method's spec; comparing a method with a method's name
    (``method == "memoir"``, ``method in ("tpatcher", ...)``) is what the spec rows replaced."""
    root = Path(__file__).parents[1] / "src" / "kedit"
    found = []
    for f in root.rglob("*.py"):
        if "editors" in f.relative_to(root).parts or "remote" in f.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                if any(c.value in METHODS for c in consts):
                    found.append(f"{f.relative_to(root)}:{node.lineno}")
    assert not found, f"branches on a method name: {found}"


def test_no_caller_reads_the_old_per_capability_dicts():
    """ATTACHERS / RETRACTORS / OWNERS / EDITORS are views kept for outside code; kedit itself asks spec()."""
    root = Path(__file__).parents[1] / "src" / "kedit"
    views = {"ATTACHERS", "RETRACTORS", "OWNERS", "EDITORS"}
    found = [f"{f.relative_to(root)}:{node.lineno}" for f in root.rglob("*.py") if f != root / "editors" / "registry.py"
             for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
             if (isinstance(node, ast.Name) and node.id in views)
             or (isinstance(node, ast.alias) and node.name in views)]
    assert not found, f"reads the old dicts instead of spec(): {found}"


def test_refresh_reads_statistics_as_the_spec_says(monkeypatch):
    """The refresh config's answer comes from the method's spec row, not from the method's name."""
    import dataclasses

    from kedit.config import RefreshConfig
    from kedit.editors import registry

    assert not RefreshConfig(method="memoir").reads_key_statistics
    monkeypatch.setitem(registry.SPECS, "memoir", dataclasses.replace(registry.SPECS["memoir"], needs_statistics=True))
    assert RefreshConfig(method="memoir").reads_key_statistics



def test_bench_tables_compare_only_the_settings_a_method_reads(tmp_path):
    """A run records only its method's settings, so the shared defaults block's other keys are not a
    difference from the shipped file."""
    from kedit.bench.tables import shipped_settings

    (tmp_path / "m.yaml").write_text("defaults:\n  v_lr: 2.0\n  L2: 3\ntpatcher:\n  tp_lr: 0.2\n  why: {tp_lr: x}\n")
    assert shipped_settings("m", "tpatcher", tmp_path) == {"tp_lr": 0.2}
    assert shipped_settings("m", "alphaedit", tmp_path) == {"v_lr": 2.0, "L2": 3}
    assert set(load_hparams("tpatcher", path=tmp_path / "m.yaml").to_dict()) >= {"tp_lr"}
