"""Top-p through each row's best candidates keeps exactly the tokens a full sort of the vocabulary
keeps: the same nucleus, also where it outgrows the candidates or ties sit at its edge."""

from __future__ import annotations

import torch

from specray.workers.engine import sampling
from specray.workers.engine.sampling import TOP_P_CANDIDATES, RowCut


def full_sort_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The reference: sort the whole row (ties by id), keep the prefix whose mass before each
    token is below top_p."""
    sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True, stable=True)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))


def test_top_p_equals_the_full_sort_on_every_kind_of_row():
    torch.manual_seed(0)
    vocab = 4096
    peaked = torch.randn(4, vocab) * 8  # nucleus of a few tokens
    flat = torch.randn(4, vocab) * 0.1  # nucleus of thousands: past the candidates
    tied = torch.full((4, vocab), -5.0)
    tied[:, :3] = 4.0  # three equal best tokens, the nucleus ends among them
    tied[:, 100 : 100 + TOP_P_CANDIDATES + 40] = 1.0  # a tie across the candidates' edge
    tied[2:, :3] = -5.0
    logits = torch.cat((peaked, flat, tied))
    for p in (0.05, 0.5, 0.8, 0.95, 0.999):
        top_p = torch.full((logits.shape[0], 1), p)
        got = sampling._top_p(logits, RowCut(None, top_p, p))
        want = full_sort_top_p(logits, top_p)
        for row in range(logits.shape[0]):
            assert torch.equal(got[row], want[row]), (
                f"top_p={p}, row {row}: kept {int((got[row] > -torch.inf).sum())} tokens, "
                f"the full sort {int((want[row] > -torch.inf).sum())}"
            )


def test_top_p_of_a_vocabulary_smaller_than_the_candidates():
    logits = torch.randn(3, TOP_P_CANDIDATES // 2)
    top_p = torch.tensor([[0.3], [0.9], [1.0]])
    assert torch.equal(sampling._top_p(logits, RowCut(None, top_p, 1.0)), full_sort_top_p(logits, top_p)), (
        "a small vocabulary's nucleus differs from the full sort's"
    )
