"""How many rows a linear layer must compute so that each row's result does not depend on the
batch: the CPU's GEMM picks its kernel by the row count, and a few counts take a path with another
reduction order. Measured on AMX/AVX-512 CPUs with torch 2.13: in bf16 only a single row (GEMV)
differs from every other count; in fp32 counts below 12 that are not a multiple of 4 differ.
The decoder pads its rows up to this count (the extra rows are computed and dropped), which costs
little where a step's matmuls cost about the same for 1 and 16 rows. Our packed bf16 GEMM
(`cpu_linear.py`) is invariant at every row count and needs no padding.
"""

from __future__ import annotations

import torch

from specray.kernels.cpu_linear import uses_packed_gemm


def invariant_rows(num_rows: int, dtype: torch.dtype, device: torch.device) -> int:
    """The row count to compute `num_rows` rows with the same kernel as any other batch."""
    if device.type != "cpu" or uses_packed_gemm(dtype, device):
        return num_rows
    if dtype == torch.float32:
        return num_rows if num_rows >= 12 else -(-num_rows // 4) * 4
    return max(num_rows, 2)
