"""Progress of long steps, for the people watching them.

Each line goes to the ``kedit.progress`` logger and is appended to ``<workspace>/logs/progress.log``.
The nightly steps run in Prefect workers, other processes than the console that started them; the
file is how ``kedit nightly demo`` echoes each step and the statistics collection while they run
(:class:`ProgressTail`), and ``tail -f`` shows the same lines anywhere the workspace is.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("kedit.progress")


def progress_path(root: str | Path) -> Path:
    return Path(root) / "logs" / "progress.log"


class StepProgress:
    """``report(msg)`` writes ``HH:MM:SS step: msg`` to the log and the workspace's progress file."""

    def __init__(self, root: str | Path | None, step: str, echo: bool = False) -> None:
        self.path = progress_path(root) if root is not None else None
        self.step = step
        self.echo = echo  # also print the line to stderr (a command whose output is not a terminal)

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {self.step}: {msg}"
        log.info(line)
        if self.echo:
            print(line, file=sys.stderr, flush=True)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one short write with O_APPEND: lines from concurrent workers do not interleave
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:  # progress is for people; never fail a step over it
            log.debug("progress file %s: %s", self.path, exc)


def ticker(report: Callable[[str], None], total: int, label: str, unit: str = "tokens",
           every_s: float = 15.0, every_frac: float = 0.1) -> Callable[[int], None]:
    """A ``tick(done)`` that reports ``label: done/total unit (pct), rate, time left`` at most every
    ``every_s`` seconds or each ``every_frac`` of the total, and always at the end."""
    t0 = time.perf_counter()
    state = {"t": t0, "frac": 0.0, "start": None}

    def tick(done: int) -> None:
        now = time.perf_counter()
        if state["start"] is None:
            state["start"] = done
        frac = done / total if total else 1.0
        if done < total and now - state["t"] < every_s and frac - state["frac"] < every_frac:
            return
        state["t"], state["frac"] = now, frac
        rate = (done - state["start"]) / max(now - t0, 1e-9)
        left = f", ~{_duration((total - done) / rate)} left" if 0 < done < total and rate > 0 else ""
        report(f"{label}: {done:,}/{total:,} {unit} ({100 * min(frac, 1.0):.0f}%), {rate:,.0f} {unit}/s{left}")

    return tick


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def reported(step: str) -> Callable:
    """Decorate a nightly step ``f(ws, ...)``: it reports when it starts, and when it ends how long it
    took (or that it failed, with the error)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(ws, *args: Any, **kw: Any) -> Any:
            report = StepProgress(getattr(ws, "root", None), step)
            report("started")
            t0 = time.perf_counter()
            try:
                out = fn(ws, *args, **kw)
            except Exception as exc:
                report(f"failed after {_duration(time.perf_counter() - t0)}: {type(exc).__name__}: {exc}")
                raise
            report(f"done in {_duration(time.perf_counter() - t0)}")
            return out

        return run

    return wrap


class ProgressTail:
    """The lines appended to a workspace's progress file since this object was made."""

    def __init__(self, root: str | Path) -> None:
        self.path = progress_path(root)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()
