"""What kedit's commands share to talk to people: a console that does not wrap when its output is not
a terminal, a switchable rich log, a one-line device label, and the atomic PNG write of a figure.

A base module: it imports nothing of kedit's but :mod:`kedit.atomic`, so any layer (evaluation,
tracing, benchmarks, commands) can use it without pointing up."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

import torch

from kedit.atomic import write_bytes_atomic

PIPE_WIDTH = 120  # width of rules and tables when writing to a file or a pipe (text itself never wraps)


def make_console(stderr: bool = False, file: IO[str] | None = None, **kw):
    """A rich Console for kedit's output. In a terminal it wraps at the terminal's width as usual;
    written to a file, a pipe or a CI log, lines are never wrapped (``soft_wrap``), so a printed
    command such as ``kedit approve <state> --by <you>`` can be copied and pasted whole."""
    from rich.console import Console

    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    if not is_tty and not os.environ.get("COLUMNS"):
        kw.setdefault("width", PIPE_WIDTH)
    return Console(file=stream, soft_wrap=not is_tty, **kw)


def device_str(device: torch.device) -> str:
    """The device a result was measured on, as it goes into results.json (CPU: cores and threads)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import os
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class ProgressLog:
    """``log(msg)`` prints a timestamped line to stderr when enabled, nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            self.console = make_console(stderr=True)

    def __call__(self, msg: str) -> None:
        if self.enabled:
            self.console.log(msg)


def save_fig(fig, path: str | Path, dpi: int = 130) -> None:
    """Write a matplotlib figure as a PNG atomically (a reader never sees half a file) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
