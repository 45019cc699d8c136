"""How oneDNN must be called so that a row's result does not depend on its batch.

oneDNN picks its GEMM kernel, and with it the reduction order, by the call's row count (and, for
some shapes, by how it splits the rows between threads), so a token's logits would change with the
number of tokens that share its step, and speculative decoding would no longer be lossless.
Measured with torch 2.13 by computing every row alone and inside calls of 1-400 rows:

- 2-core AMX Xeon, fp32: 1 row, 2-3 rows (small layers), 2-15 rows (576→1,536 and larger) and 16+
  rows each form a class, and 1,536→576 splits again at 57-128 rows; bf16: the 576→49,152 LM head
  and 576→3,072 change at 33 rows, the other layers never.
- 2-core AMD EPYC (AVX-512 BF16, no AMX), fp32: counts below 12 that are not a multiple of 4 differ.

Blocks of 4, 8 or 12 rows in fp32, and of 2 to 32 rows in bf16, give every row the same bits on both
CPUs (`tests/workers/models/test_batch_invariance.py`). `linear` pads the rows to such blocks (the
extra rows repeat the last one and are dropped), which costs little where a matmul costs about the
same for 1 and 16 rows. Our packed bf16 GEMM (`cpu_linear.py`) is invariant at every row count and
needs none of this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowBlocks:
    """Calls of `min_rows` to `max_rows` rows, each a multiple of `multiple`."""

    min_rows: int
    multiple: int
    max_rows: int

    def __post_init__(self) -> None:
        if not (0 < self.min_rows <= self.max_rows and self.min_rows % self.multiple == 0):
            raise ValueError(f"{self}: need 0 < min_rows <= max_rows, min_rows a multiple of multiple")
        if self.max_rows % self.multiple:
            raise ValueError(f"{self}: max_rows must be a multiple of multiple")

    def padded(self, rows: int) -> int:
        """The row count to compute for `rows` rows."""
        return max(self.min_rows, -(-rows // self.multiple) * self.multiple)

    def sizes(self, padded_rows: int) -> list[int]:
        """The calls' row counts for a padded row count."""
        sizes = [self.max_rows] * (padded_rows // self.max_rows)
        rest = padded_rows % self.max_rows
        if rest and rest < self.min_rows:  # e.g. a lone bf16 row: the block before lends it rows
            sizes[-1] -= self.min_rows - rest
            rest = self.min_rows
        return sizes + [rest] if rest else sizes


ONEDNN_ROW_BLOCKS = {
    torch.float32: RowBlocks(min_rows=4, multiple=4, max_rows=12),
    torch.bfloat16: RowBlocks(min_rows=2, multiple=1, max_rows=32),
}


def linear_in_blocks(
    x: torch.Tensor, out_features: int, matmul: Callable[[torch.Tensor], torch.Tensor], blocks: RowBlocks
) -> torch.Tensor:
    """`matmul` (a linear layer on oneDNN) of `x`'s rows, computed in `blocks` so each row gets the
    bits it gets in any batch."""
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    padded = blocks.padded(count)
    if padded > count:
        rows = torch.cat((rows, rows[-1:].expand(padded - count, -1)))
    sizes = blocks.sizes(padded)
    out = matmul(rows) if len(sizes) == 1 else torch.cat([matmul(block) for block in rows.split(sizes)])
    return out[:count].view(*x.shape[:-1], out_features)
