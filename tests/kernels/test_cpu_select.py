"""Row-wise top-k (`cpu_select.cpp`) as the Markov sampler uses it for candidate columns."""

from __future__ import annotations

import torch

from specray.kernels.markov_sampling import top_columns


def test_top_columns_are_the_largest_logits_with_ties_to_the_lower_column() -> None:
    """The candidate columns (our CPU top-k where it is built): the M largest values of each slot in
    descending order, equal values ordered by column, whatever the row's position in the batch."""
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 1000)
    logits[1, 2, 500:520] = 7.0  # a run of ties at the top
    values, cols = top_columns(logits, 37)
    expected = logits.topk(37, dim=-1).values
    assert torch.equal(values, expected), "top-k values differ from torch.topk's"
    assert torch.equal(logits.gather(-1, cols), values), "columns do not hold their values"
    assert cols[1, 2, :20].tolist() == list(range(500, 520)), "ties not ordered by column"
    alone, alone_cols = top_columns(logits[2:3, 1:2], 37)
    assert torch.equal(alone_cols[0, 0], cols[2, 1]), "a row's candidates depend on the batch"


def test_top_columns_of_a_bf16_block_and_of_one_column() -> None:
    """bf16 logits are ranked by their exact fp32 values; M = 1 is the argmax."""
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 257).bfloat16()
    values, cols = top_columns(logits, 1)
    assert torch.equal(cols[..., 0], logits.float().argmax(-1)), "M = 1 is not the argmax"
    assert values.dtype == torch.float32 and torch.equal(values[..., 0], logits.float().amax(-1))
