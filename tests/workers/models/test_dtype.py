"""`--dtype auto`: bf16 where the hardware computes in bf16 natively (CUDA, AMX-BF16 or AVX-512
BF16 CPUs), fp32 elsewhere; explicit names taken as they are."""

from __future__ import annotations

import pytest
import torch

from specray.kernels import cpu_features
from specray.workers.models.dtype import resolve_dtype


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),
        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx512f", "avx2"}, torch.float32),
        (set(), torch.float32),
    ],
)
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    assert resolve_dtype("auto") == expected, f"auto on a CPU with {sorted(flags)}"


def test_auto_is_bf16_on_cuda_and_names_are_taken_as_given(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset())
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16
    assert resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8")
