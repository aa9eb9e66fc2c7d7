"""The one recipe that opens an edit session: settings, key statistics if the method reads them, the editor.

The nightly refresh, ``kedit edit`` and ``kedit bench lifelong`` all call :func:`prepare_edit`, so
they load the same settings, collect statistics at the same layers, and build the editor the same
way; what differs between methods comes from the method's :class:`~kedit.editors.registry.EditorSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.editors.base import Editor, EditorState, EditRequest
from kedit.editors.common import EditCaches
from kedit.editors.hparams import EditHparams, load_hparams
from kedit.editors.registry import EditorSpec, get_editor, spec
from kedit.editors.session import EditSession, SessionCheckpoint


@dataclass
class EditSetup:
    """Everything a session on one model needs: the method's ``spec``, its settings ``hp``, the blocks
    it writes (``layers``, where statistics were read), the ``stats`` (None when the spec needs none)
    and the ``editor``."""

    spec: EditorSpec
    hp: EditHparams
    layers: list[int]
    stats: Any
    editor: Editor

    def session(self, lm, state: EditorState | None = None, caches: EditCaches | None = None) -> EditSession:
        """A new session on ``lm``, continuing from ``state`` (e.g. the champion's)."""
        return EditSession(lm, self.editor, self.stats, state, caches, self.spec)

    def resume(self, lm, checkpoint: SessionCheckpoint, caches: EditCaches | None = None,
               applied: list[EditRequest] | None = None) -> EditSession:
        """The session ``checkpoint`` recorded, continued on ``lm`` (see :meth:`EditSession.resume`)."""
        return EditSession.resume(lm, self.editor, checkpoint, self.stats, caches, applied, self.spec)


def prepare_edit(lm, method: str, ws, *, hp: EditHparams | None = None, hparams_file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, stats_corpus: Any = "wiki-summaries-en",
                 stats_tokens: int | None = None, stats_seq_len: int | None = None,
                 stats_batch_size: int | None = None, stats_progress: bool = True,
                 progress: Callable[..., Any] | None = None) -> EditSetup:
    """Settings (``hp``, else the model's file or ``hparams_file`` with ``overrides``), key statistics
    at the method's edit layers when its spec reads them (from ``ws``'s cache, or collected:
    ``stats_*`` as :func:`kedit.stats.collect.ensure_stats` takes them, None: its default), and the
    editor (prompt prefixes cached under ``ws.cache_dir``; ``progress``: its v* callback)."""
    s = spec(method)
    hp = hp if hp is not None else load_hparams(method, lm, hparams_file, overrides)
    if s.check_model is not None:  # before statistics or edits (memoir: refuses an uncalibrated store model)
        s.check_model(lm, hp)
    layers = s.edit_layers(hp, lm.adapter.num_layers)
    stats = None
    if s.needs_statistics:
        from kedit.stats.collect import ensure_stats

        kw = {k: v for k, v in (("max_tokens", stats_tokens), ("seq_len", stats_seq_len),
                                ("batch_size", stats_batch_size)) if v is not None}
        stats = ensure_stats(lm, layers, ws, stats_corpus, progress=stats_progress, **kw)
    editor = get_editor(method, hp, cache_dir=ws.cache_dir, progress=progress)
    return EditSetup(s, hp, layers, stats, editor)
