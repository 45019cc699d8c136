"""Paged KV cache: fixed-size blocks shared by all sequences, with rollback of rejected tokens.

A sequence owns a list of blocks (its block table) and a length: the number of leading positions
whose keys/values are valid. Speculative verification writes K/V for draft tokens; rolling back to
the accepted length just lowers the length and returns blocks no longer needed.
"""

from __future__ import annotations

import torch

from specray.workers.models.config import ModelConfig


class OutOfBlocksError(RuntimeError):
    """The cache has no free block for a sequence's next tokens."""


class PagedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        scratch_block: bool = False,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One more block that no sequence ever owns: padded steps (cuda_graphs.py) write their
        # padding tokens' K/V there.
        self.scratch_block = num_blocks if scratch_block else None
        shape = (num_blocks + scratch_block, block_size, config.num_kv_heads, config.head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_layers)
        ]
        self.device = torch.device(device)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._lengths: dict[str, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def length(self, seq_id: str) -> int:
        return self._lengths.get(seq_id, 0)

    def reserve(self, seq_id: str, total_tokens: int) -> None:
        """Make room for positions 0..total_tokens-1 of the sequence."""
        table = self._tables.setdefault(seq_id, [])
        self._lengths.setdefault(seq_id, 0)
        extra = self.blocks_needed(total_tokens) - len(table)
        if extra > len(self._free):
            raise OutOfBlocksError(f"sequence {seq_id} needs {extra} more KV blocks, {len(self._free)} free")
        for _ in range(max(extra, 0)):
            table.append(self._free.pop())

    def set_length(self, seq_id: str, length: int) -> None:
        """Mark the first `length` positions valid; blocks past them go back to the pool (rollback)."""
        table = self._tables[seq_id]
        if length > len(table) * self.block_size:
            raise ValueError(f"sequence {seq_id}: length {length} exceeds its reserved capacity")
        self._lengths[seq_id] = length
        keep = self.blocks_needed(length)
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, seq_id: str) -> None:
        self._free.extend(reversed(self._tables.pop(seq_id, [])))
        self._lengths.pop(seq_id, None)

    def block_tables(self, seq_ids: list[str], device: torch.device | None = None) -> torch.Tensor:
        """Padded [B, max_blocks] int32 block tables for these sequences (on the cache's device
        unless `device` says otherwise)."""
        tables = [self._tables[s] for s in seq_ids]
        lengths = torch.tensor([len(t) for t in tables])
        width = max(1, int(lengths.max()))
        flat = torch.tensor([block for t in tables for block in t], dtype=torch.int32)
        padded = torch.zeros(len(tables), width, dtype=torch.int32)
        padded[torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)] = flat
        return padded.to(device or self.device)
