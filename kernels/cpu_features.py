"""What this CPU can do, read from /proc/cpuinfo (empty elsewhere)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_amx_bf16() -> bool:
    """Whether bf16 matmuls run on AMX here (the step then costs about the same for 1 and 16 rows)."""
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


def has_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AMX or AVX-512 BF16): bf16 is then the faster
    dtype. Measured on a 2-core AMD EPYC with AVX-512 BF16 and no AMX (`specray bench engine
    --dtype float32 --dtype bfloat16`, batch 1): bf16 decodes 2.2-2.4x the tokens/s of fp32 under
    oneDNN, 6.1x with our packed GEMM and fused layer (`cpu_linear.py`, 61.6 vs 10.1 tok/s)."""
    return has_amx_bf16() or "avx512_bf16" in cpu_flags()
