"""Sampled outputs follow their distributions: chi-square goodness of fit at significance ALPHA, seeded.

The reference functions run on CPU with many samples; the kernels equal them exactly on every input
(the equality tests), and on a GPU (`-m gpu`) the same statistics are checked on the kernels directly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from scipy.stats import chisquare

from specray.kernels.acceptance import accept_drafts
from specray.kernels.markov_sampling import sample_markov_block

# Each fit is rejected by chance with probability ALPHA; seeds make the outcome fixed.
ALPHA = 1e-3
GAMMA = 3
# Target and draft distributions per position over a 6-token vocabulary; the draft is far off.
TARGET = torch.tensor(
    [
        [0.30, 0.25, 0.20, 0.10, 0.10, 0.05],
        [0.05, 0.05, 0.10, 0.20, 0.25, 0.35],
        [0.50, 0.02, 0.08, 0.15, 0.05, 0.20],
        [0.10, 0.30, 0.10, 0.30, 0.10, 0.10],
    ]
)
DRAFT = torch.tensor(
    [
        [0.05, 0.05, 0.10, 0.20, 0.30, 0.30],
        [0.40, 0.30, 0.10, 0.10, 0.05, 0.05],
        [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],
    ]
)


def fit_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * counts.sum()
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def verify_many(accept: Callable, rows: int, one_hot: bool, device: str, seed: int = 0) -> torch.Tensor:
    """Emitted tokens [rows, γ+1] of `rows` independent verifications of drafts sampled from DRAFT."""
    g = torch.Generator().manual_seed(seed)
    if one_hot:
        # A deterministic drafter (n-gram) always proposes token 0.
        drafts, draft_probs = torch.zeros(rows, GAMMA, dtype=torch.long), None
    else:
        drafts = torch.stack(
            [torch.multinomial(DRAFT[k], rows, replacement=True, generator=g) for k in range(GAMMA)], 1
        )
        draft_probs = DRAFT.expand(rows, -1, -1).to(device)
    _, emitted = accept(
        drafts.to(device),
        torch.full((rows,), GAMMA, device=device),
        TARGET.expand(rows, -1, -1).to(device),
        draft_probs,
        torch.zeros(rows, dtype=torch.bool, device=device),
        torch.rand(rows, GAMMA + 1, generator=g).to(device),
    )
    return emitted


def assert_follows_target(emitted: torch.Tensor) -> None:
    # Token j exists only when j-1 drafts passed; given that, it is distributed as TARGET[j].
    for j in range(GAMMA + 1):
        column = emitted[:, j]
        assert fit_p_value(column[column >= 0], TARGET[j]) > ALPHA, f"position {j}"


@pytest.mark.parametrize("one_hot", [False, True], ids=["p_d", "one-hot"])
def test_rejection_sampling_follows_the_target(one_hot: bool) -> None:
    emitted = verify_many(accept_drafts, 40_000, one_hot, "cpu")
    assert_follows_target(emitted)


def test_the_fit_has_power() -> None:
    # The raw drafts are far from the target: the same test must reject them outright.
    drafts = torch.multinomial(DRAFT[0], 40_000, replacement=True, generator=torch.Generator().manual_seed(1))
    assert fit_p_value(drafts, TARGET[0]) < 1e-12


def test_markov_draft_follows_its_distribution() -> None:
    # Slot 0 from softmax((U_0 + W2·W1[anchor]) / T); slot 1 given x_0 from softmax((U_1 + W2·W1[x_0]) / T).
    rows, vocab, rank, temp = 30_000, 6, 3, 0.8
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, vocab, generator=g).expand(rows, -1, -1)
    w1, w2 = torch.randn(vocab, rank, generator=g), torch.randn(vocab, rank, generator=g)
    anchor = torch.full((rows,), 4)
    draft = sample_markov_block(
        logits, anchor, torch.full((rows,), temp), torch.rand(rows, 2, generator=g), w1, w2, return_probs=True
    )
    expected0 = torch.softmax((logits[0, 0] + w2 @ w1[4]) / temp, -1)
    assert fit_p_value(draft.tokens[:, 0], expected0) > ALPHA
    x0 = int(draft.tokens[:, 0].mode().values)
    expected1 = torch.softmax((logits[0, 1] + w2 @ w1[x0]) / temp, -1)
    assert fit_p_value(draft.tokens[draft.tokens[:, 0] == x0, 1], expected1) > ALPHA
    torch.testing.assert_close(draft.probs[0, 0], expected0)


def test_markov_drafts_verified_are_lossless() -> None:
    # The whole chain: draft a block with the Markov head, verify it; the output follows the target.
    rows, vocab = 30_000, 6
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, GAMMA, vocab, generator=g).expand(rows, -1, -1)
    w1, w2 = torch.randn(vocab, 2, generator=g), torch.randn(vocab, 2, generator=g)
    draft = sample_markov_block(
        logits,
        torch.zeros(rows, dtype=torch.long),
        torch.ones(rows),
        torch.rand(rows, GAMMA, generator=g),
        w1,
        w2,
        return_probs=True,
    )
    _, emitted = accept_drafts(
        draft.tokens,
        torch.full((rows,), GAMMA),
        TARGET.expand(rows, -1, -1),
        draft.probs,
        torch.zeros(rows, dtype=torch.bool),
        torch.rand(rows, GAMMA + 1, generator=g),
    )
    assert fit_p_value(emitted[:, 0], TARGET[0]) > ALPHA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("one_hot", [False, True], ids=["p_d", "one-hot"])
def test_kernel_rejection_sampling_follows_the_target_on_gpu(one_hot: bool) -> None:
    from specray.kernels.triton_acceptance import accept_drafts_triton

    emitted = verify_many(accept_drafts_triton, 400_000, one_hot, "cuda", seed=4)
    assert_follows_target(emitted)
