"""Which matmul precision v* runs in on this machine.

bfloat16 matrix products are fast only on hardware with bfloat16 units: CUDA GPUs from compute
capability 8.0 (Ampere) on, and x86 CPUs with AVX512-BF16 or AMX. Elsewhere PyTorch falls back to
a generic kernel: on a 2-core AVX2 AMD EPYC a 2048² bfloat16 product ran at 0.3 GFLOP/s against 69
in float32, and memoir on SmolLM2 (CounterFact T=20, B=10) took 29.9 s per edit with v* in bfloat16,
against 2.0 on a CPU with bfloat16 units. ``v_dtype: auto`` asks for bfloat16 where it is fast and
float32 everywhere else.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

V_DTYPES = ("float32", "bfloat16", "auto")
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_bf16_units(flags: set[str] | frozenset[str]) -> bool:
    """Whether a CPU with these ``/proc/cpuinfo`` flags multiplies bfloat16 matrices in hardware."""
    return bool(BF16_CPU_FLAGS & set(flags))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    info = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not info.exists():
        return frozenset()
    for line in info.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def fast_bf16_matmul(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products on ``device`` run on bfloat16 units."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 0)
    if dev.type == "cpu":
        return cpu_has_bf16_units(cpu_flags())
    return False


def resolve_v_dtype(v_dtype: str, device: torch.device | str) -> str:
    """The dtype v*'s replayed matmuls run in: ``auto`` is bfloat16 where :func:`fast_bf16_matmul`,
    else float32; an explicit ``float32`` or ``bfloat16`` is kept as asked."""
    if v_dtype not in V_DTYPES:
        raise ValueError(f"v_dtype must be one of {V_DTYPES}, got {v_dtype!r}")
    if v_dtype == "auto":
        return "bfloat16" if fast_bf16_matmul(device) else "float32"
    return v_dtype
