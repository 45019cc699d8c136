"""Triton twin of `attention.paged_attention`: new query tokens of a ragged batch over a paged KV cache.

A program owns one sequence, one KV head and a tile of its queries: the tile stacks the GQA group's
heads of consecutive query tokens (row m = query m // GROUP, head m % GROUP), so every key/value row
it loads from the cache serves the whole group and every new token, and the score product is one
tensor-core dot. Keys are walked in tiles of BLOCK_N positions through the block table with an online
softmax (flash attention), from the sliding window's start to the tile's last query.

Few sequences leave most of the GPU idle, so the key range can be split across programs
(flash-decoding): each writes an unnormalised partial and a second launch merges them.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from specray.kernels.attention import AttentionMetadata

_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _load_f32(ptr, mask):
    # bf16 under the interpreter: load with a float `other`, widen, then mask.
    return tl.where(mask, tl.load(ptr, mask=mask, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale,
    softcap,
    window,
    block_size,
    num_tokens,
    num_heads,
    stride_q_t,
    stride_q_h,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_o_t,
    stride_o_h,
    stride_table_b,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    QUERIES_PER_TILE: tl.constexpr = BLOCK_M // GROUP

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first_query = q_tile * QUERIES_PER_TILE
    if first_query < q_len:
        m = tl.arange(0, BLOCK_M)
        query = first_query + m // GROUP
        head = kv_head * GROUP + m % GROUP
        row_ok = (m < QUERIES_PER_TILE * GROUP) & (query < q_len)
        query_pos = seq_len - q_len + query
        token = (q_start + query).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = _load_f32(
            q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + d[None, :],
            row_ok[:, None] & d_ok[None, :],
        )

        # Keys this tile can see: up to its last query, from the window start of its first query.
        last_pos = tl.minimum(seq_len - q_len + first_query + QUERIES_PER_TILE, seq_len)
        first_pos = 0
        if USE_WINDOW:
            first_pos = tl.maximum(seq_len - q_len + first_query - window + 1, 0)
        first_pos = (first_pos // BLOCK_N) * BLOCK_N
        span = tl.cdiv(tl.cdiv(last_pos - first_pos, BLOCK_N), NUM_SPLITS) * BLOCK_N
        lo = first_pos + split * span
        hi = tl.minimum(lo + span, last_pos)

        row_max = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        n_offs = tl.arange(0, BLOCK_N)
        table = block_tables_ptr + seq.to(tl.int64) * stride_table_b
        for start in range(lo, hi, BLOCK_N):
            pos = start + n_offs
            key_ok = pos < hi
            page = tl.load(table + pos // block_size, mask=key_ok, other=0).to(tl.int64)
            slot = pos % block_size
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k_rows = page * stride_k_block + slot * stride_k_slot + kv_head * stride_k_head
            k = _load_f32(k_cache_ptr + k_rows[:, None] + d[None, :], kv_mask)
            scores = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision="ieee") * scale
            if USE_SOFTCAP:
                # tanh via exp: softcap * tanh(s / softcap), stable for either sign.
                x = scores / softcap
                e = tl.exp(-2.0 * tl.abs(x))
                scores = softcap * tl.where(x >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
            allowed = key_ok[None, :] & (pos[None, :] <= query_pos[:, None])
            if USE_WINDOW:
                allowed &= query_pos[:, None] - pos[None, :] < window
            scores = tl.where(allowed, scores, -float("inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            # A row that has seen no key yet keeps a finite reference so exp() gives 0, not NaN.
            ref = tl.where(new_max == -float("inf"), 0.0, new_max)
            p = tl.exp(scores - ref[:, None])
            alpha = tl.exp(row_max - ref)
            row_sum = row_sum * alpha + tl.sum(p, axis=1)
            v_rows = page * stride_v_block + slot * stride_v_slot + kv_head * stride_v_head
            v = _load_f32(v_cache_ptr + v_rows[:, None] + d[None, :], kv_mask)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee")
            row_max = new_max

        out_mask = row_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
            out_ptrs = out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + d[None, :]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            part = (split * num_tokens + token) * num_heads + head
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
            tl.store(part_ml_ptr + part * 2, row_max, mask=row_ok)
            tl.store(part_ml_ptr + part * 2 + 1, row_sum, mask=row_ok)


@triton.jit
def _merge_kernel(
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    num_tokens,
    num_heads,
    stride_o_t,
    stride_o_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    part = (s * num_tokens + token) * num_heads + head
    split_max = tl.load(part_ml_ptr + part * 2)
    split_sum = tl.load(part_ml_ptr + part * 2 + 1)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=d_ok[None, :], other=0.0)
    top = tl.max(split_max, axis=0)
    # Splits that saw no visible key carry max -inf and sum 0: weight 0.
    weight = tl.where(split_max == -float("inf"), 0.0, tl.exp(split_max - top))
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(split_sum * weight, axis=0)
    tl.store(
        out_ptr + token * stride_o_t + head * stride_o_h + d, out.to(out_ptr.dtype.element_ty), mask=d_ok
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(programs: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Key-range splits that bring the grid to about two programs per SM, each with >= 4 key tiles."""
    if device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    splits = min(triton.cdiv(target, max(programs, 1)), max(max_seq_len // (4 * block_n), 1), 32)
    return 1 if splits <= 1 else triton.next_power_of_2(splits)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Same contract as `attention.paged_attention`; `num_splits` (a power of two) overrides the key split."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[-2]
    group = num_heads // num_kv_heads
    batch = meta.seq_lens.shape[0]
    # Head dims are indexed with unit stride; views from a fused QKV projection already have it.
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_m = max(16, triton.next_power_of_2(group))
    max_q_len = max(meta.query_lens)
    # Enough rows for every new token of a verify step (γ+1) in one tile; prefill spreads over tiles.
    block_m = max(block_m, min(triton.next_power_of_2(group * max_q_len), 64))
    block_n = 32 if head_dim > 128 else 64
    q_tiles = triton.cdiv(max_q_len, block_m // group)
    max_seq_len = max(meta.seq_lens_list)
    splits = num_splits or _num_splits(batch * num_kv_heads * q_tiles, max_seq_len, block_n, q.device)
    if splits > 1:
        part_acc = torch.empty(splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(splits, num_tokens, num_heads, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out
    # The interpreter multiplies half-precision dots wrongly; exact in fp32 and the same products.
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    dot_dtype = tl.float32 if interpreting else _DOT_DTYPES[k_cache.dtype]
    _attention_kernel[(batch, num_kv_heads, q_tiles * splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_acc,
        part_ml,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        float(scale),
        float(softcap or 1.0),
        int(sliding_window or 0),
        meta.block_size,
        num_tokens,
        num_heads,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        meta.block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        # Triton before 3.9 needs tl.dot's K >= 16; lanes past the head dim are masked off.
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_SPLITS=splits,
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=softcap is not None,
        DOT_DTYPE=dot_dtype,
        num_warps=4 if block_m <= 32 else 8,
    )
    if splits > 1:
        _merge_kernel[(num_tokens, num_heads)](
            out,
            part_acc,
            part_ml,
            num_tokens,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim),
            NUM_SPLITS=splits,
        )
    return out
