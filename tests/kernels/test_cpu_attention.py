"""The compiled CPU attention equals the PyTorch twin on ragged batches over a shuffled paged cache
(GQA, sliding windows, soft-capping, every dtype), and treats each query row alone."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import attention_inputs

from specray.kernels import cpu_attention
from specray.kernels.attention import paged_attention

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
QUERY_LENS = [8, 1, 0, 20]  # a verify step, a decode, a sequence with nothing new, a prefill
SEQ_LENS = [37, 5, 12, 20]


@pytest.fixture(scope="module")
def compiled():
    kernel = cpu_attention.extension()
    if kernel is None:
        pytest.skip("no C++ compiler here: the PyTorch twin serves CPU attention")
    return kernel


def _run(kernel, q, k_cache, v_cache, meta, scale, window=None, softcap=None):  # noqa: ANN001
    tables, starts, lens = meta.block_tables, meta.query_start_loc, meta.seq_lens
    return kernel.paged_attention(
        q, k_cache, v_cache, tables, starts, lens, scale, window or 0, softcap or 0.0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "heads,kv_heads,window,softcap",
    [(4, 4, None, None), (8, 2, None, None), (9, 3, 6, None), (4, 2, None, 50.0)],
    ids=["mha", "gqa", "window", "softcap"],
)
def test_compiled_kernel_equals_the_twin(compiled, dtype, heads, kv_heads, window, softcap):
    q, k_cache, v_cache, meta = attention_inputs(QUERY_LENS, SEQ_LENS, heads, kv_heads, 32, 4, dtype, 1)
    ours = _run(compiled, q, k_cache, v_cache, meta, 0.2, window, softcap)
    twin = paged_attention(q, k_cache, v_cache, meta, 0.2, window, softcap)
    torch.testing.assert_close(ours.float(), twin.float(), rtol=0, atol=TOLERANCE[dtype])


def test_a_row_does_not_depend_on_its_batch(compiled):
    """The same query row over the same keys, alone or behind other rows and sequences: same bits."""
    q, k_cache, v_cache, meta = attention_inputs(QUERY_LENS, SEQ_LENS, 8, 2, 32, 4, torch.bfloat16, 2)
    batched = _run(compiled, q, k_cache, v_cache, meta, 0.2)
    # Sequence 0's last verify row is its token 8 at position 36; alone it is a one-token decode.
    alone_meta = type(meta)(
        block_tables=meta.block_tables[:1],
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=meta.seq_lens[:1],
        slot_mapping=meta.slot_mapping[7:8],
        block_size=meta.block_size,
        query_lens=[1],
        seq_lens_list=meta.seq_lens_list[:1],
    )
    alone = _run(compiled, q[7:8], k_cache, v_cache, alone_meta, 0.2)
    assert torch.equal(alone[0], batched[7])
