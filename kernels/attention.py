"""Attention of a ragged batch of new query tokens over a paged KV cache (plain-PyTorch reference).

Layout (shared with the Triton kernel):
- `k_cache`, `v_cache`: [num_blocks, block_size, num_kv_heads, head_dim] for one layer;
- `q`: [T, num_heads, head_dim], the new tokens of all sequences concatenated;
- sequence b owns queries `query_start_loc[b]:query_start_loc[b+1]`, its KV occupies positions
  `0..seq_lens[b]-1` (the new tokens' K/V already written), pages `block_tables[b]`;
- query i of sequence b sits at position `seq_lens[b] - q_len[b] + i` and sees keys at positions
  `<=` its own (causal among the new tokens), and only the last `sliding_window` of them when set.

The metadata that is the same for every layer is built once per forward; this reference path's
padded layout (gather indices, masks) only when it runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PaddedLayout:
    """The reference path's padded view of a ragged batch (built only when that path runs)."""

    key_slots: torch.Tensor  # [B, K_max] long, flat cache slot of each key (0 where padded)
    query_index: torch.Tensor  # [B, Q_max] long, row of q for each padded query (0 where padded)
    query_valid: torch.Tensor  # [B, Q_max] bool
    query_pos: torch.Tensor  # [B, Q_max] long
    key_valid: torch.Tensor  # [B, K_max] bool
    key_pos: torch.Tensor  # [K_max] long
    # First flat slot when the batch is one sequence whose pages are consecutive: its keys are then
    # a view of the cache, no gather needed.
    contiguous_start: int | None = None

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """Boolean [B, 1, Q_max, K_max] mask: True where a query may attend to a key; None when a
        single query token sees every key anyway."""
        num_keys = self.key_pos.shape[0]
        if self.query_pos.shape == (1, 1) and (sliding_window is None or num_keys <= sliding_window):
            return None
        qpos = self.query_pos.unsqueeze(-1)
        kpos = self.key_pos.view(1, 1, -1)
        allowed = (kpos <= qpos) & self.key_valid.unsqueeze(1)
        if sliding_window is not None:
            allowed &= qpos - kpos < sliding_window
        # Padded query rows attend to key 0 so softmax stays finite; their output is discarded.
        allowed |= ~self.query_valid.unsqueeze(-1) & (kpos == 0)
        return allowed.unsqueeze(1)


@dataclass
class AttentionMetadata:
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, KV length including the new tokens
    slot_mapping: torch.Tensor  # [T] long, flat cache slot of each new token
    block_size: int
    query_lens: list[int]
    seq_lens_list: list[int]
    # [T] long, position of each new token in its sequence (the runners' rotary input; the kernels
    # derive positions from the lengths themselves). Set by `build_attention_metadata`.
    positions: torch.Tensor | None = None

    @functools.cached_property
    def padded(self) -> PaddedLayout:
        """The same for every layer of a forward, so built once, and only where it is used."""
        return _padded_layout(self.block_tables, self.query_lens, self.seq_lens_list, self.block_size)


def build_attention_metadata(
    block_tables: torch.Tensor, query_lens: list[int], seq_lens: list[int], block_size: int
) -> AttentionMetadata:
    """Metadata for a ragged batch: per sequence its number of new tokens and its KV length after them.

    Built with tensor ops on the block tables' device (no per-token Python): the host only hands
    over the two small lists.
    """
    device = block_tables.device
    lengths = torch.tensor([query_lens, seq_lens], dtype=torch.int32, device=device)
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int32, device=device)
    starts[1:] = lengths[0].cumsum(0)
    positions, slots = token_slots(block_tables, starts, lengths[1], sum(query_lens), block_size)
    return AttentionMetadata(
        block_tables=block_tables.to(torch.int32),
        query_start_loc=starts,
        seq_lens=lengths[1],
        slot_mapping=slots,
        block_size=block_size,
        query_lens=list(query_lens),
        seq_lens_list=list(seq_lens),
        positions=positions,
    )


def token_slots(
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    num_tokens: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, flat cache slot) of each of the `num_tokens` new tokens, both [T] long: token i of
    sequence b sits at `seq_lens[b] - q_len[b] + i`, in page `block_tables[b][pos // block_size]`."""
    device = block_tables.device
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    # `output_size` keeps repeat_interleave from reading the total back from the device.
    owner = torch.repeat_interleave(
        torch.arange(len(query_lens), device=device), query_lens, output_size=num_tokens
    )
    offset = torch.arange(num_tokens, device=device) - query_start_loc[:-1].long()[owner]
    positions = (seq_lens.long() - query_lens)[owner] + offset
    pages = block_tables.long()[owner, positions // block_size]
    return positions, pages * block_size + positions % block_size


def _padded_layout(
    block_tables: torch.Tensor, query_lens: list[int], seq_lens: list[int], block_size: int
) -> PaddedLayout:
    device = block_tables.device
    batch = len(query_lens)
    q_max = max(query_lens)
    k_max = max(seq_lens)
    q_lens = torch.tensor(query_lens, dtype=torch.long, device=device)
    s_lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
    query_start = torch.zeros(batch, dtype=torch.long, device=device)
    query_start[1:] = q_lens.cumsum(0)[:-1]
    key_pos = torch.arange(k_max, device=device)
    key_valid = key_pos.unsqueeze(0) < s_lens.unsqueeze(1)
    page = block_tables.long().gather(
        1, (key_pos // block_size).clamp(max=block_tables.shape[1] - 1).expand(batch, -1)
    )
    key_slots = torch.where(key_valid, page * block_size + key_pos % block_size, 0)
    offsets = torch.arange(q_max, device=device)
    query_valid = offsets.unsqueeze(0) < q_lens.unsqueeze(1)
    query_pos = (s_lens - q_lens).unsqueeze(1) + offsets.unsqueeze(0)
    query_index = torch.where(query_valid, query_start.unsqueeze(1) + offsets.unsqueeze(0), 0)
    contiguous_start = None
    if batch == 1 and (k_max == 1 or bool((key_slots[0, 1:] - key_slots[0, :-1] == 1).all())):
        contiguous_start = int(key_slots[0, 0])
    return PaddedLayout(
        key_slots=key_slots,
        query_index=query_index,
        query_valid=query_valid,
        query_pos=query_pos,
        key_valid=key_valid,
        key_pos=key_pos,
        contiguous_start=contiguous_start,
    )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Store the new tokens' keys/values [T, KVH, D] into their cache slots."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = v.to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention output [T, H, D] for the new query tokens `q` [T, H, D]."""
    layout = meta.padded
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[-2]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    if layout.contiguous_start is not None:
        window = slice(layout.contiguous_start, layout.contiguous_start + layout.key_pos.shape[0])
        keys = flat_k[window].unsqueeze(0).transpose(1, 2).to(q.dtype)  # [1, KVH, K, D]
        values = flat_v[window].unsqueeze(0).transpose(1, 2).to(q.dtype)
        queries = q.unsqueeze(0).transpose(1, 2)  # [1, H, Q, D]
    else:
        keys = flat_k[layout.key_slots].transpose(1, 2).to(q.dtype)  # [B, KVH, K, D]
        values = flat_v[layout.key_slots].transpose(1, 2).to(q.dtype)
        queries = q[layout.query_index].transpose(1, 2)  # [B, H, Q, D]
    mask = layout.mask(sliding_window)
    if softcap is None:
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    else:
        group = num_heads // num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = (queries @ keys.transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(dim=-1) @ values
    if layout.contiguous_start is not None:
        return out[0].transpose(0, 1)
    return out.transpose(1, 2)[layout.query_valid]
