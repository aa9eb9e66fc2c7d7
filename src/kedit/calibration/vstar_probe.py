"""v*'s learning rate and step budget from a short convergence probe on the model.

v* (the change of the memory layer's output at the subject that makes every prompt context predict the
new object, :mod:`kedit.editors.vstar`) is optimised for a few calibration facts at each candidate
learning rate, with a generous step cap and the stop rule memoir ships (mean target NLL below
``v_stop_nll``). The rate whose requests converge in the fewest steps wins; ``v_steps`` is the
slowest converged request's step count at that rate with head-room. A rate whose steps grow against
the previous one ends the probe (past the best rate Adam only overshoots).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from kedit.editors.base import EditRequest
from kedit.editors.hparams import EditHparams


@dataclass
class ProbeRun:
    lr: float
    steps: list[int]  # per request
    converged: list[bool]
    seconds: float

    @property
    def converged_share(self) -> float:
        return sum(self.converged) / max(len(self.converged), 1)

    @property
    def mean_steps(self) -> float:
        return sum(self.steps) / max(len(self.steps), 1)


@dataclass
class ProbeResult:
    lr: float
    steps: int
    runs: list[ProbeRun] = field(default_factory=list)
    records: list[int] = field(default_factory=list)


def choose_lr(runs: Sequence[ProbeRun], min_converged: float = 0.9, headroom: float = 1.5, min_steps: int = 10,
              cap: int = 60) -> tuple[float, int]:
    """``(v_lr, v_steps)`` from probe runs: among runs where at least ``min_converged`` of the requests
    reached the stop, the one with the fewest mean steps (ties: the smaller rate); ``v_steps`` = its
    slowest converged request's steps (counted from 1) x ``headroom``, within ``[min_steps, cap]``. No
    run good enough: the run with the most converged, and the cap."""
    if not runs:
        raise ValueError("no probe runs")
    ok = [r for r in runs if r.converged_share >= min_converged]
    if not ok:
        best = max(runs, key=lambda r: (r.converged_share, -r.mean_steps, -r.lr))
        return best.lr, cap
    best = min(ok, key=lambda r: (r.mean_steps, r.lr))
    slowest = max(s + 1 for s, c in zip(best.steps, best.converged) if c)
    return best.lr, int(min(cap, max(min_steps, math.ceil(slowest * headroom))))


def probe(lm, requests: list[EditRequest], prefixes: list[str], hp: EditHparams, layer: int,
          lrs: Sequence[float] = (0.5, 1.0, 2.0, 4.0), cap: int = 40,
          progress: Callable[[str], None] | None = None) -> list[ProbeRun]:
    """v* for ``requests`` at ``layer`` at each learning rate in ``lrs`` (increasing), at most ``cap`` steps."""
    from kedit.editors.vstar import optimise_vstar

    runs: list[ProbeRun] = []
    for lr in sorted(lrs):
        vs = optimise_vstar(lm, requests, prefixes, replace(hp, v_lr=float(lr), v_steps=cap), layer)
        run = ProbeRun(lr=float(lr), steps=[d.vstar_steps for d in vs.diagnostics],
                       converged=[bool(d.constraint_met) for d in vs.diagnostics], seconds=vs.seconds)
        runs.append(run)
        if progress:
            progress(f"v* lr {lr:g}: {sum(run.converged)}/{len(run.converged)} converged, "
                     f"{run.mean_steps:.1f} steps on average, {run.seconds:.1f} s")
        if len(runs) >= 2 and runs[-2].converged_share >= run.converged_share and run.mean_steps > runs[-2].mean_steps:
            break
    return runs
