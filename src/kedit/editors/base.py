"""The contract every editor follows.

:class:`Editor`: ``editor.compute(lm, requests, state, stats, caches=...) -> EditResult`` returns
explicit per-module weight deltas, the editor's new persistent state and per-request diagnostics,
and leaves the model's weights as it found them. Applying the deltas is a separate step
(:func:`apply_deltas`), so lineage can store exactly what was added, and a failure mid-way never
leaves a model half-edited. What else a method can do (add parameters, retract a fact, export) is
declared in its row of :mod:`kedit.editors.registry`, never guessed from the editor object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from kedit.editors.hparams import EditHparams


@dataclass
class EditRequest:
    """One fact change. ``prompt`` is a template with exactly one ``{}`` for the subject."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighbors: list[str] = field(default_factory=list)
    id: str | None = None

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise ValueError(f"request {self.id or self.subject!r}: prompt must contain exactly one '{{}}': "
                             f"{self.prompt!r}")
        if not self.subject.strip() or not self.target_new.strip():
            raise ValueError(f"request {self.id or self.prompt!r}: subject and target_new must be non-empty")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EditorState:
    """Persistent editor state carried from batch to batch (e.g. AlphaEdit's Σ K_p K_pᵀ per layer).

    ``tensors`` is saved as safetensors and ``meta`` as JSON by the lineage store; nothing is pickled.
    """

    method: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> EditorState:
        return EditorState(self.method, {k: v.clone() for k, v in self.tensors.items()}, dict(self.meta))


@dataclass
class RequestDiagnostics:
    """How one request went: v* optimisation and whether the new target took."""

    request_id: str | None
    vstar_loss_start: float
    vstar_loss_end: float
    vstar_steps: int
    target_prob: float  # P(target_new) at the end of the v* optimisation (teacher forcing)
    delta_norm: float  # ‖v* − v‖ at the last edit layer
    constraint_met: bool  # loss reached the early-stop threshold
    norm_anchor_skipped: bool = False  # v_norm_anchor: v* norm above the skip factor, fact NOT applied


@dataclass
class EditResult:
    """Per-parameter deltas (state-dict key -> tensor in the parameter's stored layout and dtype),
    the editor's new state, per-request diagnostics, and per-layer numbers (update norms, null-space
    dimension...)."""

    deltas: dict[str, torch.Tensor]
    state: EditorState
    diagnostics: list[RequestDiagnostics]
    layer_info: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    vstar: Any = None  # the VStar the deltas were written from (a solver sweep reuses it)


def apply_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    """Add ``deltas`` to the model's parameters in place, all or nothing.

    Shapes and names are checked before any weight changes; the addition happens in the
    parameter's own dtype, so replaying the same deltas from the same weights is bit-exact.
    """
    params = dict(model.named_parameters())
    for name, d in deltas.items():
        if name not in params:
            raise KeyError(f"delta for unknown parameter {name!r}")
        if tuple(d.shape) != tuple(params[name].shape):
            raise ValueError(f"delta for {name} has shape {tuple(d.shape)}, parameter has {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, d in deltas.items():
            p = params[name]
            d = d.to(device=p.device, dtype=p.dtype)
            p.add_(d if sign == 1.0 else d * sign)


@runtime_checkable
class Editor(Protocol):
    """What :class:`~kedit.editors.session.EditSession` calls on every editor.

    Built as ``cls(hparams, cache_dir=..., progress=...)``. ``compute`` runs one batch against the
    model as it is (with the state's added parameters attached, if any) and returns the batch's
    result without changing the model's weights; ``stats`` are the key statistics the method's spec
    asks for (None when it needs none); ``caches`` the run's :class:`~kedit.editors.common.EditCaches`
    (None: the editor's own, for this call)."""

    method: str
    hp: EditHparams

    def compute(self, lm: Any, requests: list[EditRequest], state: EditorState | None = None, stats: Any = None,
                caches: Any = None) -> EditResult: ...
