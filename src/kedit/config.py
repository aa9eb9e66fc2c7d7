"""What a nightly refresh does (:class:`RefreshConfig`), read from params.yaml.

Its own module, below the steps (:mod:`kedit.refresh`) and the gate (:mod:`kedit.evaluation.candidate`,
:mod:`kedit.lineage.gate`), which read the model and device from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RefreshConfig:
    """What a nightly refresh does; read from the ``refresh:`` block of params.yaml, overridable."""

    model: str = "smollm2-135m"
    method: str = "memoir"  # params.yaml refresh.method: the editor measured best over 1,000+ edits
    device: str = "cpu"
    trace_sample: int = 1
    trace_noise_samples: int = 5
    # what the refresh reads from a trace is the MLP effects' peak layer: tracing the hidden states and
    # attention too costs twice as much again (add "hidden", "attn" for the full picture)
    trace_kinds: list[str] = field(default_factory=lambda: ["mlp"])
    edit_batch_size: int = 10  # a feed is applied in sequential batches of this size (0: one batch)
    approval_timeout_s: int = 24 * 3600
    edit_timeout_s: int = 4 * 3600  # the orchestrator's limit on the edit task (Prefect timeout_seconds)
    gate_timeout_s: int = 2 * 3600  # and on the evaluate-and-gate task
    stats_corpus: str = "wiki-summaries-en"
    stats_max_tokens: int = 200_000
    stats_seq_len: int = 256
    stats_batch_size: int = 16
    hparams_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params_file: str | Path | None = None, workspace: Any = None,
                    **overrides: Any) -> RefreshConfig:
        """The ``refresh:`` block, ``model.slug`` and ``stats:`` of params.yaml (found by
        :func:`kedit.params.find_params`), then ``overrides`` (``None`` values ignored)."""
        from kedit.params import load_params

        params = load_params(params_file, workspace)
        data: dict[str, Any] = params.block("refresh")
        stats = params.block("stats")
        for k in ("corpus", "max_tokens", "seq_len", "batch_size"):
            if k in stats:
                data[f"stats_{k}"] = stats[k]
        if params.block("model").get("slug"):
            data["model"] = params.block("model")["slug"]
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"refresh config: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)

    def __post_init__(self) -> None:
        from kedit.tracing import KINDS

        bad = [k for k in self.trace_kinds if k not in KINDS] if isinstance(self.trace_kinds, list) else None
        if bad is None or bad or not self.trace_kinds:
            raise ValueError(f"refresh.trace_kinds: expected a non-empty list of {list(KINDS)}, got {self.trace_kinds!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def reads_key_statistics(self) -> bool:
        """Does this refresh's editor read key statistics (E[k kᵀ] over a corpus)?

        The method's spec row answers (:attr:`kedit.editors.registry.EditorSpec.needs_statistics`): the
        editors that add parameters kept in their editor state (memoir, T-Patcher) read none, their
        memory set plays that part; the weight editors (ROME, MEMIT, AlphaEdit) need them."""
        from kedit.editors.registry import spec

        return spec(self.method).needs_statistics
