"""The Triton Markov block sampler equals `sample_markov_block` on random batches."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, markov_inputs

pytest.importorskip("triton")

from specray.kernels.markov_sampling import MarkovDraft, sample_markov_block  # noqa: E402
from specray.kernels.triton_markov import sample_markov_block_triton  # noqa: E402

# A vocabulary that is not a multiple of the tile, and a rank wider than one rank tile (16).
VOCAB, RANK, D_MODEL, BLOCK_V = 300, 40, 24, 64


def assert_same(args: dict, return_probs: bool = True, block_v: int = BLOCK_V) -> MarkovDraft:
    expected = sample_markov_block(**args, return_probs=return_probs)
    got = sample_markov_block_triton(**args, return_probs=return_probs, block_v=block_v)
    assert torch.equal(got.tokens.cpu(), expected.tokens.cpu())
    torch.testing.assert_close(got.token_probs.cpu(), expected.token_probs.cpu(), rtol=1e-5, atol=1e-7)
    if return_probs:
        torch.testing.assert_close(got.probs.cpu(), expected.probs.cpu(), rtol=1e-5, atol=1e-7)
    else:
        assert got.probs is None
    if expected.confidence is None:
        assert got.confidence is None
    else:
        torch.testing.assert_close(got.confidence.cpu(), expected.confidence.cpu(), rtol=1e-5, atol=1e-6)
    return expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_markov_head_with_confidence(device: str, dtype: torch.dtype) -> None:
    draft = assert_same(markov_inputs(4, 3, VOCAB, RANK, D_MODEL, dtype, 1, device=device))
    # Sampled rows' token probabilities are the probabilities of the returned distributions.
    picked = draft.probs.gather(2, draft.tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked, draft.token_probs)
    assert bool((draft.token_probs[0] == 1.0).all())  # row 0 is greedy: one-hot


def test_rank_zero_without_confidence(device: str) -> None:
    assert_same(
        markov_inputs(4, 3, VOCAB, 0, D_MODEL, torch.bfloat16, 2, with_conf=False, device=device),
        return_probs=False,
    )


def test_rank_zero_with_confidence(device: str) -> None:
    assert_same(markov_inputs(3, 2, VOCAB, 0, D_MODEL, torch.float32, 3, device=device))


def test_banned_tokens(device: str) -> None:
    # -inf logits (a token the drafter must never propose) filling a whole vocabulary tile and more.
    args = markov_inputs(4, 2, VOCAB, RANK, D_MODEL, torch.float32, 7, device=device)
    args["logits"][:, :, : BLOCK_V + 6] = -float("inf")
    draft = assert_same(args)
    assert bool((draft.tokens >= BLOCK_V + 6).all())


def test_gamma_one(device: str) -> None:
    assert_same(markov_inputs(4, 1, VOCAB, RANK, D_MODEL, torch.float16, 4, device=device))


def test_wide_row_tile(device: str) -> None:
    # More than 32 rows takes the 64-row tile; a single vocabulary tile covers a small vocabulary.
    assert_same(
        markov_inputs(36, 2, 100, 8, D_MODEL, torch.bfloat16, 5, device=device),
        return_probs=False,
        block_v=128,
    )


def test_the_markov_bias_changes_the_draft() -> None:
    # Guard against a test that passes because the bias is negligible.
    args = markov_inputs(8, 4, VOCAB, RANK, D_MODEL, torch.float32, 6)
    with_bias = sample_markov_block(**args)
    without = sample_markov_block(**{**args, "w1": None, "w2": None, "conf_weight": None})
    assert not torch.equal(with_bias.tokens, without.tokens)


def _draft_vocabulary_case(device: str, dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
    """A block over a draft vocabulary: every third token id, W1 over all ids, W2 over the columns."""
    args = markov_inputs(4, 3, VOCAB, RANK, D_MODEL, dtype, 8, device=device)
    ids = torch.arange(1, VOCAB, 3, device=device)
    return {**args, "logits": args["logits"][..., ids], "w2": args["w2"][ids], "token_ids": ids}, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_draft_vocabulary(device: str, dtype: torch.dtype) -> None:
    args, ids = _draft_vocabulary_case(device, dtype)
    draft = assert_same(args)
    assert bool(torch.isin(draft.tokens, ids).all()), "a draft outside the draft vocabulary"
    assert draft.probs.shape[-1] == ids.numel()
    picked = draft.probs.gather(2, (draft.tokens.unsqueeze(-1) - 1) // 3).squeeze(-1)
    torch.testing.assert_close(picked, draft.token_probs)


def test_draft_vocabulary_is_the_full_vocabulary_with_the_rest_banned() -> None:
    """Sampling C columns named by token_ids = sampling the whole vocabulary with every other token
    at −inf: same tokens, same probabilities, same confidences (W1 is read by token id)."""
    args, ids = _draft_vocabulary_case("cpu", torch.float32)
    full = markov_inputs(4, 3, VOCAB, RANK, D_MODEL, torch.float32, 8)
    banned = torch.ones(VOCAB, dtype=torch.bool)
    banned[ids] = False
    full["logits"][..., banned] = -float("inf")
    reduced = sample_markov_block(**args, return_probs=True)
    expected = sample_markov_block(**full, return_probs=True)
    assert torch.equal(reduced.tokens, expected.tokens)
    torch.testing.assert_close(reduced.token_probs, expected.token_probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reduced.probs, expected.probs[..., ids], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reduced.confidence, expected.confidence)


def test_candidates_sample_each_slot_among_its_top_columns() -> None:
    """With M candidates a slot's distribution is the full one restricted to its M columns of largest
    backbone logit (the rest at −inf), and the probabilities returned are exactly it."""
    args = markov_inputs(4, 3, VOCAB, RANK, D_MODEL, torch.float32, 9)
    draft = sample_markov_block(**args, return_probs=True, candidates=20)
    top = args["logits"].topk(20, dim=-1).indices
    outside = torch.ones_like(args["logits"], dtype=torch.bool).scatter_(-1, top, False)
    banned = {**args, "logits": args["logits"].masked_fill(outside, -float("inf"))}
    expected = sample_markov_block(**banned, return_probs=True)
    greedy = args["temperature"] <= 0
    assert torch.equal(draft.tokens[greedy], expected.tokens[greedy])
    # Slot 0 depends on the anchor alone: the same distribution in every row.
    torch.testing.assert_close(draft.probs[:, 0], expected.probs[:, 0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(draft.confidence[:, 0], expected.confidence[:, 0])
    assert bool((draft.probs[outside] == 0).all()), "probability outside a slot's candidates"
    assert bool(torch.gather(~outside, 2, draft.tokens.unsqueeze(-1)).all())
    picked = draft.probs.gather(2, draft.tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked, draft.token_probs)
    torch.testing.assert_close(draft.probs.sum(-1), torch.ones(4, 3))


def test_the_calibration_shift_is_added_after_the_temperature() -> None:
    # The reference is the spec every kernel is compared with: c_k = σ(logit_k / t_k + s_k).
    args = markov_inputs(8, 4, VOCAB, RANK, D_MODEL, torch.float32, 8)
    shifted = sample_markov_block(**args).confidence
    unshifted = sample_markov_block(**{**args, "conf_shift": None}).confidence
    torch.testing.assert_close(
        shifted,
        torch.sigmoid(torch.logit(unshifted.double()) + args["conf_shift"]).float(),
        msg="the confidence is not σ(logit / t_k + s_k)",
    )
