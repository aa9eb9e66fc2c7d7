"""One row per edit method: everything callers need to know about it, in one table.

Callers ask a method's :class:`EditorSpec` (``spec(method)``) what it can do: whether it adds
parameters (and how to attach them), whether it reads key statistics, which layers it writes, how to
retract a fact, which fact owns each added row, what an exported directory ships. Nothing branches on
a method's name outside this table, so a new editor is one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kedit.editors import alphaedit, memoir, tpatcher
from kedit.editors.alphaedit import AlphaEditEditor
from kedit.editors.base import EditorState
from kedit.editors.hparams import METHODS, EditHparams, VStarHparams, for_method, hparams_type, load_hparams
from kedit.editors.memit import MEMITEditor
from kedit.editors.memoir import MemoirEditor
from kedit.editors.rome import ROMEEditor
from kedit.editors.tpatcher import TPatcherEditor


def _resolved_layers(hp: EditHparams, num_layers: int) -> list[int]:
    return hp.resolve_layers(num_layers)


@dataclass(frozen=True)
class EditorSpec:
    """What one edit method is and can do.

    ``editor(hparams, cache_dir=, progress=)`` builds its :class:`~kedit.editors.base.Editor`;
    ``hparams`` is its settings class. An editor that ``adds_parameters`` returns no weight deltas
    and keeps its parameters in the state: ``attach(lm, state)`` puts them on a model (idempotent),
    ``retract(state, fact_id)`` is a new state without one fact's rows, ``owners(state)`` the fact
    of each added row in row order, ``export(lm, state)`` the ``(spec, tensors)`` an exported
    directory ships (None: nothing to add). ``needs_statistics``: the editor reads key second-moment
    statistics at ``edit_layers(hp, num_layers)`` (the blocks it writes). ``upgrade(editor, lm, state,
    applied)`` brings a state an older version wrote up to date on resume. ``prepare(lm, hp, stats,
    layers, caches)`` does once, into the run's caches, work its first batch would otherwise do, and
    returns a per-layer report (AlphaEdit: null-space dimensions). ``check_model(lm, hp)`` refuses
    settings that do not fit the model before anything is edited (memoir: settings not measured on a
    store model, :mod:`kedit.editors.memoir.calibrated`)."""

    name: str
    editor: type
    hparams: type[EditHparams]
    adds_parameters: bool = False
    needs_statistics: bool = True
    attach: Callable[[Any, EditorState], Any] | None = None
    retract: Callable[[EditorState, str], EditorState] | None = None
    owners: Callable[[EditorState], list[str]] | None = None
    export: Callable[[Any, EditorState], tuple[dict[str, Any], dict[str, Any]] | None] | None = None
    upgrade: Callable[..., EditorState] | None = None
    edit_layers: Callable[[EditHparams, int], list[int]] = _resolved_layers
    prepare: Callable[..., dict[int, Any]] | None = None
    check_model: Callable[[Any, EditHparams], None] | None = None

    def __post_init__(self) -> None:
        if self.adds_parameters != (self.attach is not None):
            raise ValueError(f"editor spec {self.name!r}: an editor that adds parameters needs attach, "
                             "and only such an editor has one")
        if (self.retract is None) != (self.owners is None):
            raise ValueError(f"editor spec {self.name!r}: retract and owners go together")

    @property
    def retractable(self) -> bool:
        """Whether one fact can be removed exactly (its rows dropped, the rest rebuilt)."""
        return self.retract is not None

    @property
    def writes_vstar(self) -> bool:
        """Whether the editor runs the shared v* optimisation (its settings carry ``v_*``)."""
        return issubclass(self.hparams, VStarHparams)


SPECS: dict[str, EditorSpec] = {s.name: s for s in (
    EditorSpec("rome", ROMEEditor, hparams_type("rome")),
    EditorSpec("memit", MEMITEditor, hparams_type("memit")),
    EditorSpec("alphaedit", AlphaEditEditor, hparams_type("alphaedit"), prepare=alphaedit.prepare),
    EditorSpec("tpatcher", TPatcherEditor, hparams_type("tpatcher"), adds_parameters=True,
               needs_statistics=False,  # its memory set plays their part
               attach=tpatcher.attach, retract=lambda state, fact_id: tpatcher.without_facts(state, [fact_id]),
               owners=lambda state: [str(o) for o in state.meta.get("patch_facts", [])],
               export=tpatcher.export_added),
    EditorSpec("memoir", MemoirEditor, hparams_type("memoir"), adds_parameters=True,
               needs_statistics=False,  # only its own background mean, kept in the state
               attach=memoir.attach, retract=memoir.retract,
               owners=lambda state: [str(o) for o in state.meta.get("entry_owner", [])],
               export=memoir.export_added, upgrade=MemoirEditor.upgrade,
               edit_layers=lambda hp, num_layers: [memoir.memory_layer(hp, num_layers)],
               check_model=memoir.require_calibrated),
)}
if tuple(SPECS) != METHODS:  # every method with settings has a spec row, in the same order
    raise RuntimeError(f"editor specs {tuple(SPECS)} do not match the settings' methods {METHODS}")


def spec(method: str) -> EditorSpec:
    """The spec row of ``method``."""
    if method not in SPECS:
        raise ValueError(f"unknown edit method {method!r}; choose one of {METHODS}")
    return SPECS[method]


def spec_of(editor: Any) -> EditorSpec:
    """The spec row of an editor object (by its ``method``)."""
    method = getattr(editor, "method", None)
    if method not in SPECS:
        raise ValueError(f"editor {type(editor).__name__} (method {method!r}) has no spec row; register it in "
                         f"kedit.editors.registry.SPECS or pass spec= explicitly")
    return SPECS[method]


# views of the table for code written before it (read-only use; ask spec() instead)
EDITORS = {m: s.editor for m, s in SPECS.items()}
ATTACHERS = {m: s.attach for m, s in SPECS.items() if s.attach is not None}
RETRACTORS = {m: s.retract for m, s in SPECS.items() if s.retract is not None}
OWNERS = {m: s.owners for m, s in SPECS.items() if s.owners is not None}


def get_editor(method: str, hparams: EditHparams | None = None, model=None, cache_dir=None, progress=None):
    """An editor for ``method``; ``hparams`` default to the model's file (see :func:`load_hparams`)."""
    s = spec(method)
    hp = for_method(hparams or load_hparams(method, model), method)
    return s.editor(hp, cache_dir=cache_dir, progress=progress)


def attach_state(lm, state=None) -> None:
    """Make ``lm``'s added computations those of ``state``: attach the state's method when it adds
    parameters, and take every other added-capacity method off (a weight editor's state, or None
    for the base model, leaves none attached)."""
    from kedit.editors.attach import detach

    model = getattr(lm, "model", lm)
    method = getattr(state, "method", None)
    for s in SPECS.values():
        if s.attach is None:
            continue
        if s.name == method:
            s.attach(lm, state)
        else:
            detach(model, s.name)
