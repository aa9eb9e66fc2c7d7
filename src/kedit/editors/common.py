"""What the three editors share: key statistics access, the per-run caches (projectors, prefixes),
weight snapshots that are restored even on error, and the state bookkeeping."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.atomic import save_tensors_atomic, sha256_json, sha256_tensor
from kedit.editors.base import EditorState, EditRequest
from kedit.editors.linalg import nullspace_basis

log = logging.getLogger(__name__)


@dataclass
class KeyStats:
    """Mean uncentred second moment E[k kᵀ] of the edited matrices' inputs, per layer."""

    mom2: dict[int, torch.Tensor]
    key: str  # content key: caches derived from these statistics (projectors) are keyed by it
    dir: Path | None = None
    n_tokens: int = 0


def as_key_stats(stats: Any, layers: list[int], key_dim: int) -> KeyStats:
    """Accept a StatsBundle (``.mom2``, ``.key``, ``.dir``) or a plain ``{layer: C}`` dict."""
    if stats is None:
        raise ValueError("this editor needs key statistics (second moments) for its layers: "
                         "pass kedit.stats.collect.ensure_stats(lm, layers, ws) or run `kedit stats collect`")
    if isinstance(stats, dict):
        mom2 = {int(k): v for k, v in stats.items()}
        ks = KeyStats(mom2=mom2, key=sha256_json({k: sha256_tensor(v) for k, v in sorted(mom2.items())}))
    else:
        ks = KeyStats(mom2={int(k): v for k, v in stats.mom2.items()}, key=str(stats.key),
                      dir=Path(stats.dir) if getattr(stats, "dir", None) else None,
                      n_tokens=int(getattr(stats, "n_tokens", 0)))
    missing = [i for i in layers if i not in ks.mom2]
    if missing:
        raise ValueError(f"key statistics lack layers {missing} (have {sorted(ks.mom2)}); collect them for "
                         f"the edit layers {layers}")
    for i in layers:
        if tuple(ks.mom2[i].shape) != (key_dim, key_dim):
            raise ValueError(f"key statistics for layer {i} have shape {tuple(ks.mom2[i].shape)}, "
                             f"expected ({key_dim}, {key_dim})")
    return ks


@dataclass
class EditCaches:
    """What an editing run derives once and reuses for every batch: null-space bases and prompt prefixes.

    Owned by the object that runs the edits (:class:`kedit.editors.session.EditSession`) and passed
    down to the editor, so it lives exactly as long as the run: a long-lived worker that edits many
    models keeps no process-wide memo growing with every model or statistics key. The disk caches
    (``<stats dir>/projectors/``, ``<cache dir>/contexts/``) still make a new run's first use cheap.
    """

    projectors: dict[str, torch.Tensor] = field(default_factory=dict)
    prefixes: dict[str, list[str]] = field(default_factory=dict)


def projector(stats: KeyStats, layer: int, model_hash: str, threshold: float, mode: str,
              memo: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """Null-space basis U (projector P = U Uᵀ) and its dimension for one layer, computed once per
    (model, layer, stats, threshold) and cached next to the statistics (``<stats dir>/projectors/``,
    float64) and in ``memo`` (a run's :attr:`EditCaches.projectors`) when given."""
    key = sha256_json({"model": model_hash, "layer": layer, "stats": stats.key, "thr": threshold, "mode": mode})
    if memo is not None and key in memo:
        U = memo[key]
        return U, U.shape[1]
    path = stats.dir / "projectors" / f"U_L{layer}_{key[:16]}.safetensors" if stats.dir else None
    if path is not None and path.exists():
        from safetensors.torch import load_file

        U = load_file(str(path))["U"]
    else:
        U = nullspace_basis(stats.mom2[layer], threshold, mode)
        if path is not None:
            try:
                save_tensors_atomic(path, {"U": U}, {"rank": str(U.shape[1]), "layer": str(layer),
                                                     "model_hash": model_hash, "stats_key": stats.key,
                                                     "threshold": repr(threshold), "mode": mode})
            except OSError as exc:  # read-only stats dir: keep it in memory only
                log.warning("could not cache projector at %s: %s", path, exc)
    if memo is not None:
        memo[key] = U
    return U, U.shape[1]


@contextlib.contextmanager
def weights_restored(lm, layers: list[int]) -> Iterator[None]:
    """Snapshot the edited matrices; put them back bit-exactly on exit, error or not."""
    saved = {i: lm.adapter.mlp_out(i).weight.detach().clone() for i in layers}
    try:
        yield
    finally:
        with torch.no_grad():
            for i, w in saved.items():
                lm.adapter.mlp_out(i).weight.copy_(w)


def apply_layer_delta(lm, layer: int, delta_out_in: torch.Tensor) -> torch.Tensor:
    """Add an ``[out, in]`` update to the live weight (in its dtype) and return it in stored layout,
    exactly as :func:`apply_deltas` will add it later."""
    w = lm.adapter.mlp_out(layer).weight
    stored = lm.adapter.to_stored(delta_out_in.to(w.dtype)).to(w.device)
    with torch.no_grad():
        w.add_(stored)
    return stored


def check_requests(requests: list[EditRequest]) -> None:
    if not requests:
        raise ValueError("no edit requests given")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise TypeError(f"request #{i} is a {type(r).__name__}, expected EditRequest")


def check_state(state: EditorState | None, method: str, layers: list[int], model_hash: str) -> EditorState:
    """A fresh state, or the given one after checking it belongs to this method/model/layers."""
    if state is None:
        return EditorState(method=method, meta={"n_edits": 0, "n_batches": 0, "layers": layers,
                                                "model_hash": model_hash})
    if state.method != method:
        raise ValueError(f"editor state is for {state.method!r}, not {method!r}")
    if state.meta.get("layers") not in (None, layers):
        raise ValueError(f"editor state was built for layers {state.meta.get('layers')}, hparams say {layers}")
    if state.meta.get("model_hash") not in (None, model_hash):
        raise ValueError("editor state belongs to a different base model "
                         f"({str(state.meta.get('model_hash'))[:12]} vs {model_hash[:12]})")
    return state.copy()


def cache_name(layer: int) -> str:
    return f"cache_c.L{layer}"
