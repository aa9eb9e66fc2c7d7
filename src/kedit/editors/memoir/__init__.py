"""Sparse residual memory (MEMOIR-style): edits live in a zero-initialised matrix W' beside one MLP
down-projection, written and read only through sparse, input-dependent column masks; the base
weights never change, and a token that matches no stored edit runs exactly the base computation.

One module per concept: :mod:`.memory` (the math), :mod:`.read` (the live read hook and its read
shares), :mod:`.state` (the editor state and its set-up), :mod:`.migrate` (states older versions
wrote), :mod:`.write` (writing a batch), :mod:`.retract`, :mod:`.export`, :mod:`.editor`,
:mod:`.calibrated` (a store model needs settings measured on it). How it
works and what was measured on the way: docs/editors/memoir-findings.md.
"""

from kedit.editors.memoir.calibrated import UncalibratedModel, require_calibrated
from kedit.editors.memoir.editor import MemoirEditor
from kedit.editors.memoir.export import export_added
from kedit.editors.memoir.memory import (
    MemoryReadout,
    SpanGuard,
    closed_form_blocks,
    fingerprint,
    memory_delta,
    one_hot_sets,
    overlaps,
    own_block_delta,
    previous_tokens,
    read_memory,
    residual_matrix,
    warm_start,
)
from kedit.editors.memoir.migrate import with_span_keys
from kedit.editors.memoir.read import (
    attach,
    exact_read_scale,
    read_scale,
    reads_own_block,
    scheduled_share,
    text_inputs,
)
from kedit.editors.memoir.retract import retract, select_entries
from kedit.editors.memoir.state import (
    BG,
    BLOCK_U,
    BLOCK_V,
    EXACT,
    MASKS,
    METHOD,
    PERM,
    SPAN,
    SPAN_ON,
    VSTAR,
    W,
    background_mean,
    block_rank,
    check_state,
    initial_state,
    memory_layer,
)
from kedit.editors.memoir.write import Written, inputs_at, span_keys, write_batch

__all__ = [
    "BG", "BLOCK_U", "BLOCK_V", "EXACT", "MASKS", "METHOD", "PERM", "SPAN", "SPAN_ON", "VSTAR", "W",
    "MemoirEditor", "MemoryReadout", "UncalibratedModel", "SpanGuard", "Written", "attach", "background_mean", "block_rank",
    "check_state", "closed_form_blocks", "exact_read_scale", "export_added", "fingerprint", "initial_state",
    "inputs_at", "memory_delta", "memory_layer", "one_hot_sets", "overlaps", "own_block_delta",
    "previous_tokens", "read_memory", "read_scale", "reads_own_block", "require_calibrated", "residual_matrix",
    "retract",
    "scheduled_share", "select_entries", "span_keys", "text_inputs", "warm_start", "with_span_keys",
    "write_batch",
]
