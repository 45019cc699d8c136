"""One proposal for many sequences drafts what one proposal per sequence drafts.

Every trained kind, with and without a draft vocabulary, over sequences of different lengths, with
greedy and sampled rows and different draft limits in one batch. The batch pads contexts and runs
its matmuls over more rows, so the numbers may round differently: tokens must be identical,
probabilities equal within 2e-5 and confidences within 1e-6 (measured: ≤ 1e-5 and 6e-8). A pipelined
guess past the committed tokens is never drafted.
"""

from __future__ import annotations

import pytest
import torch

from specray.workers.drafters.checkpoint import build_model
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.draft_vocab import DraftVocab
from specray.workers.drafters.dspark import DSparkDrafter
from specray.workers.drafters.eagle3 import Eagle3Drafter
from specray.workers.engine.drafter import DraftRequest
from specray.workers.engine.sampling import SamplingParams
from tests.proposal_batches import draft_requests, observe_sequences

KINDS = {
    "dspark": {"markov_rank": 8, "confidence": True},
    "dspark-recipe": {"markov_rank": 8, "confidence": True, "state_input": True, "markov_tied": True},
    "dspark-candidates": {"markov_rank": 8, "confidence": True, "markov_tied": True, "markov_candidates": 6},
    "dflash": {},
    "eagle3": {},
}
LENGTHS = [9, 14, 20, 6]
TEMPERATURES = [0.0, 1.0, 0.7, 1.0]
LIMITS = [7, 3, 7, 5]


def _drafters(kind: str, draft_vocab_size: int, target):  # noqa: ANN001, ANN202
    torch.manual_seed(1)
    config = DrafterConfig.for_target(
        kind.split("-")[0],
        target.config,
        3,
        mask_token_id=2,
        draft_vocab_size=draft_vocab_size,
        **KINDS[kind],
    )
    model = build_model(config).eval()
    with torch.no_grad():  # a non-zero Markov output so the previous token matters
        for name, param in model.named_parameters():
            if name.startswith(("markov_out", "markov_w2")):
                param.normal_()
    if draft_vocab_size:
        ids = torch.randperm(target.config.vocab_size)[:draft_vocab_size].sort().values
        model.set_draft_vocab(DraftVocab(ids, target.config.vocab_size))
    cls = Eagle3Drafter if kind == "eagle3" else DSparkDrafter
    return cls(model, target.model), cls(model, target.model)


@pytest.mark.parametrize("draft_vocab_size", [0, 40], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_batched_proposal_equals_per_sequence_proposals(kind, draft_vocab_size, tiny_target) -> None:  # noqa: ANN001
    batched, single = _drafters(kind, draft_vocab_size, tiny_target)
    ids = observe_sequences([batched, single], LENGTHS, 3 * 32)
    # Twice: the second proposal reads the context KV the first one cached.
    for _ in range(2):
        together = batched.propose(draft_requests(ids, LIMITS, TEMPERATURES, first_seed=10))
        alone = [single.propose([r])[0] for r in draft_requests(ids, LIMITS, TEMPERATURES, first_seed=10)]
        for i, (a, b) in enumerate(zip(together, alone)):
            assert a.tokens == b.tokens, f"row {i}: batched drafts {a.tokens}, alone {b.tokens}"
            assert len(a.tokens) == LIMITS[i]
            assert (a.probs is None) == (b.probs is None) == (TEMPERATURES[i] == 0.0)
            if a.probs is not None:
                torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=2e-5)
            if a.confidence is not None:
                assert a.confidence == pytest.approx(b.confidence, abs=1e-6), f"row {i} confidence"


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_a_guess_past_the_committed_tokens_is_never_drafted(kind, tiny_target) -> None:  # noqa: ANN001
    """A pipelined draft worker's guess gets no proposal even when the features it needs arrived
    first: whether they did is a race, and a seeded request's draws must not depend on one."""
    drafter, _ = _drafters(kind, 0, tiny_target)
    ids = list(range(3, 15))
    drafter.observe("s0", torch.randn(len(ids) - 1, 3 * 32), 0)
    params = SamplingParams(max_tokens=50, temperature=1.0)
    guess = DraftRequest("s0", ids, 5, params, torch.Generator().manual_seed(0), committed=len(ids) - 3)
    committed = DraftRequest("s0", ids, 5, params, torch.Generator().manual_seed(0))
    assert drafter.propose([guess])[0].tokens == [], "a guess past the committed tokens was drafted"
    assert drafter.propose([committed])[0].tokens, "the same context, committed, got no proposal"


def test_a_request_cannot_commit_more_tokens_than_it_has() -> None:
    with pytest.raises(ValueError, match="committed=5 outside 0..4"):
        DraftRequest("s", [1, 2, 3, 4], 3, SamplingParams(max_tokens=8), torch.Generator(), committed=5)
