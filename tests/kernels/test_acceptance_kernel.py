"""The Triton acceptance kernel equals `accept_drafts` on random ragged batches, and so does the
greedy-only `accept_greedy` on greedy rows."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, acceptance_inputs

pytest.importorskip("triton")

from specray.kernels.acceptance import accept_drafts, accept_greedy  # noqa: E402
from specray.kernels.triton_acceptance import accept_drafts_triton  # noqa: E402

# A vocabulary that is not a multiple of the tile, so the last tile is ragged.
VOCAB, BLOCK_V = 300, 128


def assert_same(args: dict, block_v: int = BLOCK_V) -> tuple[torch.Tensor, torch.Tensor]:
    expected = accept_drafts(**args)
    got = accept_drafts_triton(**args, block_v=block_v)
    assert torch.equal(got[0].cpu(), expected[0].cpu())
    assert torch.equal(got[1].cpu(), expected[1].cpu())
    return expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["p_d", "one-hot"])
def test_mixed_ragged_batch(device: str, dtype: torch.dtype, with_draft_probs: bool) -> None:
    num_accepted, _ = assert_same(acceptance_inputs(8, 4, VOCAB, dtype, 1, with_draft_probs, device=device))
    # The batch exercises partial acceptance, not only the extremes.
    assert 0 < int(num_accepted.sum()) < 8 * 4


def test_gamma_one(device: str) -> None:
    assert_same(
        acceptance_inputs(6, 1, VOCAB, torch.float32, 2, num_drafts=[1, 0, 1, 1, 0, 1], device=device)
    )


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["p_d", "one-hot"])
def test_all_accepted(device: str, with_draft_probs: bool) -> None:
    args = acceptance_inputs(
        4, 3, VOCAB, torch.float32, 3, with_draft_probs, num_drafts=[3] * 4, accept="all", device=device
    )
    num_accepted, emitted = assert_same(args)
    assert num_accepted.tolist() == [3] * 4
    assert bool((emitted >= 0).all())  # every row ends with a bonus token


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["p_d", "one-hot"])
def test_none_accepted(device: str, with_draft_probs: bool) -> None:
    args = acceptance_inputs(
        4, 3, VOCAB, torch.bfloat16, 4, with_draft_probs, num_drafts=[3] * 4, accept="none", device=device
    )
    num_accepted, emitted = assert_same(args)
    assert num_accepted.tolist() == [0] * 4
    assert bool((emitted[:, 1:] == -1).all())


def test_no_drafts_is_autoregressive(device: str) -> None:
    assert_same(acceptance_inputs(4, 2, VOCAB, torch.float16, 5, num_drafts=[0] * 4, device=device))


def test_single_tile_vocabulary(device: str) -> None:
    assert_same(acceptance_inputs(4, 2, 50, torch.float32, 6, device=device), block_v=64)


@pytest.mark.parametrize("num_drafts", [None, [0] * 8, [4] * 8], ids=["ragged", "none", "full"])
def test_greedy_acceptance_from_the_argmax_equals_accept_drafts(num_drafts):
    """`accept_greedy` reads only the target's argmax; on greedy rows it decides as `accept_drafts`."""
    args = acceptance_inputs(8, 4, VOCAB, torch.float32, 7, num_drafts=num_drafts)
    args["greedy"] = torch.ones(8, dtype=torch.bool)
    expected = accept_drafts(**args)
    got = accept_greedy(args["draft_tokens"], args["num_drafts"], args["target_probs"].argmax(dim=-1))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
