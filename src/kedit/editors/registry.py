"""``get_editor(method, hparams)``: the one place that maps a method name to its editor class."""

from __future__ import annotations

from kedit.editors.alphaedit import AlphaEditEditor
from kedit.editors.hparams import METHODS, EditHparams, load_hparams
from kedit.editors.memit import MEMITEditor
from kedit.editors.memoir import MemoirEditor
from kedit.editors.rome import ROMEEditor

EDITORS = {"rome": ROMEEditor, "memit": MEMITEditor, "alphaedit": AlphaEditEditor, "memoir": MemoirEditor}


def get_editor(method: str, hparams: EditHparams | None = None, model=None, cache_dir=None, progress=None):
    """An editor for ``method``; ``hparams`` default to the model's file (see :func:`load_hparams`)."""
    if method not in EDITORS:
        raise ValueError(f"unknown edit method {method!r}; choose one of {METHODS}")
    hp = hparams or load_hparams(method, model)
    if hp.method != method:
        hp = EditHparams(**{**hp.to_dict(), "method": method})
    return EDITORS[method](hp, cache_dir=cache_dir, progress=progress)
