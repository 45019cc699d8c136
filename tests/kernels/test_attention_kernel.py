"""The Triton paged attention equals `paged_attention` on ragged batches over a shuffled paged cache."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, attention_inputs

pytest.importorskip("triton")

from specray.kernels.attention import paged_attention  # noqa: E402
from specray.kernels.triton_attention import paged_attention_triton  # noqa: E402

# Outputs are O(1); the tolerance is a few ulps of the storage type around 1.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# A verify step (γ+1 = 8), a decode (1), a sequence with nothing new (0) and a prefill longer than a tile.
QUERY_LENS = [8, 1, 0, 20]
SEQ_LENS = [37, 5, 12, 20]


def assert_same(
    device: str,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int = 40,
    block_size: int = 16,
    window: int | None = None,
    softcap: float | None = None,
    splits: int = 1,
    query_lens: list[int] = QUERY_LENS,
    seq_lens: list[int] = SEQ_LENS,
) -> None:
    q, k_cache, v_cache, meta = attention_inputs(
        query_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, 7, device
    )
    scale = head_dim**-0.5
    expected = paged_attention(q, k_cache, v_cache, meta, scale, window, softcap)
    got = paged_attention_triton(q, k_cache, v_cache, meta, scale, window, softcap, num_splits=splits)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float().cpu(), expected.float().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_causal_ragged(device: str, dtype: torch.dtype) -> None:
    # Group of 3 heads per KV head (SmolLM2's ratio), a head dim that is not a power of two.
    assert_same(device, dtype, heads=6, kv_heads=2)


def test_multi_head_attention(device: str) -> None:
    assert_same(device, torch.float32, heads=2, kv_heads=2, head_dim=16, block_size=4)


def test_sliding_window(device: str) -> None:
    assert_same(device, torch.bfloat16, heads=4, kv_heads=1, head_dim=32, window=6)


def test_softcap(device: str) -> None:
    assert_same(device, torch.float32, heads=4, kv_heads=2, head_dim=16, softcap=5.0)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_key_range(device: str, splits: int) -> None:
    # Splits that cover no visible key for some queries (window) must weigh nothing in the merge.
    assert_same(
        device, torch.float16, heads=4, kv_heads=2, head_dim=16, window=9, softcap=20.0, splits=splits
    )


def test_single_token_sequences(device: str) -> None:
    assert_same(
        device, torch.float32, heads=4, kv_heads=4, head_dim=16, query_lens=[1, 1, 1], seq_lens=[1, 2, 17]
    )
