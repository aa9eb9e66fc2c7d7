"""One home for the edit loop: requests applied to a live model in sequential batches.

The nightly refresh, ``kedit edit`` and ``kedit bench lifelong`` all run :class:`EditSession`, so the
benchmark measures the code path the refresh runs. A session

- runs each batch through ``editor.compute`` against the model as the earlier batches left it, and
  applies the batch's result to the live model (:meth:`EditSession.apply_result`, overridable);
- sums the deltas (what a lineage state or an edit directory records) and carries the
  :class:`~kedit.editors.base.EditorState` from batch to batch;
- owns the run's caches (:class:`~kedit.editors.common.EditCaches`: null-space bases, prompt
  prefixes) and passes them to every ``compute`` (the :class:`~kedit.editors.base.Editor` contract),
  so nothing is memoised process-wide;
- can be checkpointed (:meth:`EditSession.checkpoint`) and resumed from the record
  (:meth:`EditSession.resume`) with a bit-exact continuation;
- can run the model as it began for a while (:meth:`EditSession.unedited`), so what an edited model
  is compared with need not be kept from the start.

What the session does beyond ``compute`` comes from the method's
:class:`~kedit.editors.registry.EditorSpec`, never from inspecting the editor: an editor that *adds*
parameters instead of changing weights keeps them in the editor state and returns empty weight
deltas, and its spec's ``attach(lm, state)`` is called after every batch (and when the session starts
from a state or resumes) to put the state's modules on the model; it must be idempotent. On resume,
the spec's ``upgrade`` (if any) brings a state an older version wrote up to date.

:func:`kedit.editors.setup.prepare_edit` is the one recipe (settings, statistics if the spec asks,
the editor) that the refresh, ``kedit edit`` and the benchmark open a session with.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.atomic import save_tensors_atomic, sha256_tensor
from kedit.editors.base import EditorState, EditRequest, EditResult, RequestDiagnostics, apply_deltas
from kedit.editors.common import EditCaches
from kedit.editors.registry import EditorSpec, spec_of

CHECKPOINT_FORMAT = 1
_META_KEY = "kedit.session"


@dataclass
class BatchReport:
    """What one batch did; given to ``on_batch`` after the batch is applied to the model."""

    index: int  # 0-based number of the batch in the session (batches before a resume count)
    n: int  # requests in the batch
    done: int  # requests applied in the session after it
    seconds: float  # wall time of computing and applying it
    result: EditResult  # the batch's own deltas, diagnostics and layer info; the state after it


@dataclass
class SessionResult(EditResult):
    """An :class:`EditResult` for everything a session applied: summed deltas, the last state, every
    request's diagnostics, ``layer_info`` of the last batch plus ``batches`` (count, size), and the
    layer info of every batch in order."""

    batch_layer_info: list[dict[str, Any]] = field(default_factory=list)
    batches: int = 0
    n_edits: int = 0


@dataclass
class SessionCheckpoint:
    """A session's progress, enough to continue it bit-exactly in another process.

    ``weights`` are the live values of the edited parameters (adding the summed deltas to the start
    would round differently from adding each batch's in turn); ``start_sha256`` pins the values the
    session began from, so a resume onto another model fails loudly. ``extra`` is the caller's own
    JSON record (a benchmark's curve so far, its timings).
    """

    method: str
    deltas: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    start_sha256: dict[str, str]
    state: EditorState | None
    batches_done: int
    n_edits: int
    batch_size: int | None
    diagnostics: list[RequestDiagnostics]
    batch_layer_info: list[dict[str, Any]]
    seconds: float
    rng: torch.Tensor | None = None  # torch's CPU generator state when the checkpoint was taken
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """One safetensors file (tensors + the rest as JSON in its header), written atomically: a kill
        mid-write leaves the previous checkpoint."""
        tensors = {f"delta/{k}": v for k, v in self.deltas.items()}
        tensors |= {f"weight/{k}": v for k, v in self.weights.items()}
        if self.state is not None:
            tensors |= {f"state/{k}": v for k, v in self.state.tensors.items()}
        if self.rng is not None:
            tensors["rng/cpu"] = self.rng
        record = {"format": CHECKPOINT_FORMAT, "method": self.method, "start_sha256": self.start_sha256,
                  "state": None if self.state is None else {"method": self.state.method, "meta": self.state.meta},
                  "batches_done": self.batches_done, "n_edits": self.n_edits, "batch_size": self.batch_size,
                  "diagnostics": [asdict(d) for d in self.diagnostics], "batch_layer_info": self.batch_layer_info,
                  "seconds": self.seconds, "extra": self.extra}
        path = Path(path)
        save_tensors_atomic(path, {k: v.detach().cpu() for k, v in tensors.items()},
                            metadata={_META_KEY: json.dumps(record)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> SessionCheckpoint:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no session checkpoint at {path}")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if _META_KEY not in meta:
                raise ValueError(f"{path}: not an edit-session checkpoint (no {_META_KEY!r} record)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        rec = json.loads(meta[_META_KEY])
        if rec.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {rec.get('format')!r}, this kedit reads {CHECKPOINT_FORMAT}")

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        st = rec["state"]
        state = None if st is None else EditorState(st["method"], group("state/"), st["meta"])
        return cls(method=rec["method"], deltas=group("delta/"), weights=group("weight/"),
                   start_sha256=rec["start_sha256"], state=state, batches_done=rec["batches_done"],
                   n_edits=rec["n_edits"], batch_size=rec["batch_size"],
                   diagnostics=[RequestDiagnostics(**d) for d in rec["diagnostics"]],
                   batch_layer_info=rec["batch_layer_info"], seconds=rec["seconds"],
                   rng=tensors.get("rng/cpu"), extra=rec["extra"])


class EditSession:
    """Sequential batches of edits on one live model with one editor (see the module docstring).

    ``stats``: the key statistics the editor needs (passed to every ``compute``); ``state``: the editor
    state to continue from (e.g. the champion's); ``caches``: share one :class:`EditCaches` between
    sessions on the same model (default: the session's own); ``spec``: the method's row (default: the
    registry's row for ``editor.method``).
    """

    def __init__(self, lm, editor, stats=None, state: EditorState | None = None,
                 caches: EditCaches | None = None, spec: EditorSpec | None = None) -> None:
        self.lm = lm
        self.editor = editor
        self.spec = spec_of(editor) if spec is None else spec
        self.stats = stats
        self.caches = EditCaches() if caches is None else caches
        self._state = state
        self._total: dict[str, torch.Tensor] = {}
        self._start_sha256: dict[str, str] = {}
        # the edited parameters as the session found them, on the host (a GPU model's memory is not doubled)
        self._start_weights: dict[str, torch.Tensor] = {}
        self.diagnostics: list[RequestDiagnostics] = []
        self.batch_layer_info: list[dict[str, Any]] = []
        self.batches_done = 0
        self.n_edits = 0
        self.seconds = 0.0  # wall time of computing and applying every batch
        self.batch_size: int | None = None
        if state is not None:
            self._attach(state)

    # --- progress --------------------------------------------------------------------------------
    @property
    def state(self) -> EditorState | None:
        """The editor state after the last batch (the starting state before any)."""
        return self._state

    @property
    def total_deltas(self) -> dict[str, torch.Tensor]:
        """Sum of every batch's deltas since the session began (state-dict name -> stored layout)."""
        return dict(self._total)

    # --- running ---------------------------------------------------------------------------------
    def apply(self, requests: Sequence[EditRequest], batch_size: int = 0,
              on_batch: Callable[[BatchReport], None] | None = None) -> SessionResult:
        """Apply ``requests`` in order, ``batch_size`` at a time (0: one batch), each batch against the
        model as the earlier ones left it; ``on_batch`` is called after each. Returns :meth:`result`."""
        requests = list(requests)
        size = batch_size if batch_size and batch_size > 0 else len(requests)
        for i in range(0, len(requests), max(1, size)):
            report = self.step(requests[i:i + size], size)
            if on_batch is not None:
                on_batch(report)
        return self.result()

    def step(self, batch: Sequence[EditRequest], batch_size: int | None = None) -> BatchReport:
        """Compute one batch, apply it to the model, and add it to the session's totals."""
        batch = list(batch)
        t0 = time.perf_counter()
        res = self.editor.compute(self.lm, batch, self._state, self.stats, caches=self.caches)
        t1 = time.perf_counter()
        params = dict(self.lm.model.named_parameters())
        for name in res.deltas:  # what the session started from, to check a resume against
            if name not in self._start_sha256 and name in params:
                self._start_sha256[name] = sha256_tensor(params[name])
                self._start_weights[name] = params[name].detach().to("cpu", copy=True)  # host memory
        t2 = time.perf_counter()
        self.apply_result(res)
        seconds = (t1 - t0) + (time.perf_counter() - t2)
        self._state = res.state
        for name, d in res.deltas.items():
            self._total[name] = d.clone() if name not in self._total else self._total[name] + d
        self.diagnostics += res.diagnostics
        self.batch_layer_info.append(res.layer_info)
        self.seconds += seconds
        self.n_edits += len(batch)
        self.batch_size = batch_size or len(batch)
        report = BatchReport(index=self.batches_done, n=len(batch), done=self.n_edits, seconds=seconds, result=res)
        self.batches_done += 1
        return report

    def apply_result(self, res: EditResult) -> None:
        """Put one batch's result on the live model: add its weight deltas, then (re)attach the modules
        of an editor that adds parameters. Override for editors that need another step."""
        apply_deltas(self.lm.model, res.deltas)
        self._attach(res.state)

    def _attach(self, state: EditorState | None) -> None:
        if self.spec.attach is not None and state is not None:
            self.spec.attach(self.lm, state)

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """Inside the block the model runs as before the session's first batch: every parameter the
        session edited at its starting value (bit for bit) and the editor's added modules off; on exit,
        error or not, the edits are back as they were. A session that began from an editor state runs
        without that state's modules too. Why: the lifelong benchmark compares the edited model's
        next-token distributions with the unedited ones; kept from the start, 10,000 prompts' are 2 GB
        and a resumed run spent minutes recomputing them before its first batch."""
        from kedit.editors.attach import suspended

        params = dict(self.lm.model.named_parameters())
        live = {k: params[k].detach().clone() for k in self._start_weights}
        try:
            with torch.no_grad():
                for k, w in self._start_weights.items():
                    params[k].copy_(w)
            with suspended(self.lm.model, str(getattr(self.editor, "method", ""))):
                yield
        finally:
            with torch.no_grad():
                for k, w in live.items():
                    params[k].copy_(w)

    def result(self) -> SessionResult:
        """Everything applied so far as one result (see :class:`SessionResult`)."""
        info = dict(self.batch_layer_info[-1]) if self.batch_layer_info else {}
        if self.batches_done:
            info["batches"] = {"n": self.batches_done, "size": self.batch_size}
        return SessionResult(deltas=self.total_deltas, state=self._state, diagnostics=list(self.diagnostics),
                             layer_info=info, seconds=self.seconds, batch_layer_info=list(self.batch_layer_info),
                             batches=self.batches_done, n_edits=self.n_edits)

    # --- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, extra: dict[str, Any] | None = None) -> SessionCheckpoint:
        """The session's progress as a record (copies: later batches do not change it)."""
        params = dict(self.lm.model.named_parameters())
        return SessionCheckpoint(
            method=str(getattr(self.editor, "method", type(self.editor).__name__)),
            deltas={k: v.clone() for k, v in self._total.items()},
            weights={k: params[k].detach().cpu().clone() for k in self._total},
            start_sha256=dict(self._start_sha256), state=None if self._state is None else self._state.copy(),
            batches_done=self.batches_done, n_edits=self.n_edits, batch_size=self.batch_size,
            diagnostics=list(self.diagnostics), batch_layer_info=[dict(i) for i in self.batch_layer_info],
            seconds=self.seconds, rng=torch.random.get_rng_state(), extra=dict(extra or {}))

    @classmethod
    def resume(cls, lm, editor, checkpoint: SessionCheckpoint, stats=None,
               caches: EditCaches | None = None, applied: list[EditRequest] | None = None,
               spec: EditorSpec | None = None) -> EditSession:
        """A session that continues ``checkpoint`` on ``lm``, which must be where the checkpointed session
        began: the edited parameters take their checkpointed values, the editor state and counters
        are restored (and torch's CPU generator, so anything random continues as it would have).

        ``applied``: the requests the checkpoint holds, in order; a spec with ``upgrade`` then brings a
        state written by an older version up to date (memoir: span keys)."""
        method = getattr(editor, "method", type(editor).__name__)
        if checkpoint.method != method:
            raise ValueError(f"checkpoint is of a {checkpoint.method!r} session, the editor is {method!r}")
        params = dict(lm.model.named_parameters())
        for name, sha in checkpoint.start_sha256.items():
            if name not in params:
                raise KeyError(f"checkpoint edits parameter {name!r}, which the model does not have")
            if sha256_tensor(params[name]) != sha:
                raise ValueError(f"cannot resume: parameter {name} is not what the checkpointed session started "
                                 "from (load the same model, with the same earlier edits, as the first run)")
        missing = set(checkpoint.deltas) - set(checkpoint.weights)
        if missing:
            raise ValueError(f"checkpoint lacks the live values of {sorted(missing)}")
        start = {name: params[name].detach().to("cpu", copy=True) for name in checkpoint.start_sha256}
        with torch.no_grad():
            for name, w in checkpoint.weights.items():
                params[name].copy_(w.to(device=params[name].device, dtype=params[name].dtype))
        session = cls(lm, editor, stats, None, caches, spec)
        session._start_weights = start
        session._state = None if checkpoint.state is None else checkpoint.state.copy()
        upgrade = session.spec.upgrade
        if session._state is not None and applied is not None and upgrade is not None:
            session._state = upgrade(editor, lm, session._state, applied[: checkpoint.n_edits])
        session._total = {k: v.clone() for k, v in checkpoint.deltas.items()}
        session._start_sha256 = dict(checkpoint.start_sha256)
        session.diagnostics = list(checkpoint.diagnostics)
        session.batch_layer_info = [dict(i) for i in checkpoint.batch_layer_info]
        session.batches_done, session.n_edits = checkpoint.batches_done, checkpoint.n_edits
        session.batch_size, session.seconds = checkpoint.batch_size, checkpoint.seconds
        session._attach(session._state)
        if checkpoint.rng is not None:
            torch.random.set_rng_state(checkpoint.rng)
        return session
