"""What the benchmarks share to talk to people: a switchable rich log and a one-line device label."""

from __future__ import annotations

import torch


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
            from rich.console import Console

            self.console = Console(stderr=True)

    def __call__(self, msg: str) -> None:
        if self.enabled:
            self.console.log(msg)
