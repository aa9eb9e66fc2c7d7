"""v*'s matmul precision: bfloat16 only where the hardware multiplies it in bfloat16 units."""

import pytest
import torch

from kedit.editors import precision
from kedit.editors.hparams import EditHparams


def test_cpu_bf16_units_come_from_the_flags():
    assert precision.cpu_has_bf16_units({"fma", "avx2", "avx512f", "avx512_bf16"})
    assert precision.cpu_has_bf16_units({"avx2", "amx_bf16", "amx_tile"})
    assert not precision.cpu_has_bf16_units({"fma", "avx", "avx2"})  # AVX2-only EPYC: no units
    assert not precision.cpu_has_bf16_units({"avx512f", "avx512bw"})  # AVX-512 without BF16


def test_explicit_dtypes_are_kept_and_auto_follows_the_device(monkeypatch):
    for asked in ("float32", "bfloat16"):
        assert precision.resolve_v_dtype(asked, "cpu") == asked
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert precision.resolve_v_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert precision.resolve_v_dtype("auto", torch.device("cpu")) == "bfloat16"
    assert precision.resolve_v_dtype("auto", "meta") == "float32"
    with pytest.raises(ValueError, match="v_dtype"):
        precision.resolve_v_dtype("float16", "cpu")
    assert EditHparams(v_dtype="auto").v_dtype == "auto"


def test_this_machines_flags_are_read():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux: every x86-64 or Arm CPU lists some feature
        assert precision.fast_bf16_matmul("cpu") == precision.cpu_has_bf16_units(flags)
