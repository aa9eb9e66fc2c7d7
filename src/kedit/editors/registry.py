"""``get_editor(method, hparams)``: the one place that maps a method name to its editor class."""

from __future__ import annotations

from kedit.editors.alphaedit import AlphaEditEditor
from kedit.editors.hparams import METHODS, EditHparams, load_hparams
from kedit.editors.memit import MEMITEditor
from kedit.editors.memoir import MemoirEditor
from kedit.editors.memoir import attach as memoir_attach
from kedit.editors.memoir import retract as memoir_retract
from kedit.editors.rome import ROMEEditor
from kedit.editors.tpatcher import TPatcherEditor
from kedit.editors.tpatcher import attach as tpatcher_attach
from kedit.editors.tpatcher import without_facts as tpatcher_without_facts

EDITORS = {"rome": ROMEEditor, "memit": MEMITEditor, "alphaedit": AlphaEditEditor, "tpatcher": TPatcherEditor,
           "memoir": MemoirEditor}
# methods that add parameters kept in their editor state: ``attach(lm, state)`` puts them on the model
ATTACHERS = {"tpatcher": tpatcher_attach, "memoir": memoir_attach}
# the same methods keep each fact in rows of their own: ``retract(state, fact_id)`` is a new state
# without that fact's rows (its other tensors rebuilt from the rest), the old state left as it was
RETRACTORS = {"tpatcher": lambda state, fact_id: tpatcher_without_facts(state, [fact_id]),
              "memoir": memoir_retract}
# which fact owns each added row (patch row / memory entry), in row order, for `kedit lineage diff`
OWNERS = {"tpatcher": lambda state: [str(o) for o in state.meta.get("patch_facts", [])],
          "memoir": lambda state: [str(o) for o in state.meta.get("entry_owner", [])]}


def get_editor(method: str, hparams: EditHparams | None = None, model=None, cache_dir=None, progress=None):
    """An editor for ``method``; ``hparams`` default to the model's file (see :func:`load_hparams`)."""
    if method not in EDITORS:
        raise ValueError(f"unknown edit method {method!r}; choose one of {METHODS}")
    hp = hparams or load_hparams(method, model)
    if hp.method != method:
        hp = EditHparams(**{**hp.to_dict(), "method": method})
    return EDITORS[method](hp, cache_dir=cache_dir, progress=progress)


def attach_state(lm, state=None) -> None:
    """Make ``lm``'s added computations those of ``state``: attach the state's method when it adds
    parameters, and take every other added-capacity method off (a weight editor's state, or None
    for the base model, leaves none attached)."""
    from kedit.editors.attach import detach

    model = getattr(lm, "model", lm)
    method = getattr(state, "method", None)
    for name, attach in ATTACHERS.items():
        if name == method:
            attach(lm, state)
        else:
            detach(model, name)
