"""The hybrid drafter: it proposes the source expected to get more drafts accepted, learns each
request's n-gram confidences from that request's committed tokens only (so a seeded request
reproduces in any batch), and stays lossless (greedy identical to autoregressive, sampled output
following the target's exact distribution)."""

from __future__ import annotations

import pytest
import torch
from distribution_check import assert_follows, exact_joint

from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.dspark import DSparkDrafter, DSparkModel
from specray.workers.drafters.hybrid import HybridDrafter
from specray.workers.drafters.registry import build_drafter, drafter_feature_layers
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.drafter import DraftRequest
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams

# The context's suffix [8, 9] occurred before, followed by 10, 11, 12: an n-gram match of length 2.
CONTEXT = [5, 8, 9, 10, 11, 12, 6, 8, 9]


def _block(target, seed: int = 1, ngram_rate: float | None = None) -> DSparkDrafter:  # noqa: ANN001
    """A random DSpark drafter; `ngram_rate` is the n-gram acceptance its calibration measured."""
    torch.manual_seed(seed)
    config = DrafterConfig.for_target(
        "dspark",
        target.config,
        3,
        mask_token_id=2,
        markov_rank=8,
        confidence=True,
        state_input=True,
        ngram_acceptance=_prior(ngram_rate) if ngram_rate is not None else (),
    )
    return DSparkDrafter(DSparkModel(config).eval(), target.model)


def _prior(rate: float) -> tuple[tuple[float, ...], ...]:
    """The same acceptance rate at every position after every match length 1..4."""
    return ((rate,) * 7,) * 4


def _request(tokens: list[int], limit: int = 3, committed: int | None = None) -> DraftRequest:
    return DraftRequest("s", tokens, limit, SamplingParams(max_tokens=50), torch.Generator(), committed)


FEATURES = torch.randn(len(CONTEXT) - 1, 3 * 32, generator=torch.Generator().manual_seed(0))


def _hybrid_on_context(target, ngram_rate: float | None = None) -> HybridDrafter:  # noqa: ANN001
    hybrid = HybridDrafter(_block(target, ngram_rate=ngram_rate))
    hybrid.observe("s", FEATURES, 0)
    return hybrid


def test_it_proposes_the_source_expected_to_go_further(tiny_target) -> None:  # noqa: ANN001
    block_alone = _block(tiny_target)
    block_alone.observe("s", FEATURES, 0)
    block = block_alone.propose([_request(CONTEXT)])[0]
    expected_block = sum(torch.tensor(block.confidence).cumprod(0).tolist())

    hybrid = _hybrid_on_context(tiny_target, ngram_rate=0.99)  # calibration: n-gram drafts pass 99%
    proposal = hybrid.propose([_request(CONTEXT)])[0]
    assert proposal.tokens == [10, 11, 12] and proposal.probs is None
    assert proposal.confidence == pytest.approx([0.99] * 3), "no outcome yet: the prior's rate"
    assert sum(torch.tensor(proposal.confidence).cumprod(0).tolist()) > expected_block
    assert hybrid.choices == {"ngram": 1}

    hybrid = _hybrid_on_context(tiny_target, ngram_rate=0.01)  # ... or 1%
    proposal = hybrid.propose([_request(CONTEXT)])[0]
    assert proposal.tokens == block.tokens and proposal.confidence == pytest.approx(block.confidence)
    assert hybrid.choices == {"block": 1}


def test_the_block_is_not_drafted_where_the_ngram_beats_its_typical_proposal(tiny_target) -> None:  # noqa: ANN001
    """Once the block has drafted, a request whose n-gram match is expected to go further than the
    block's mean expected length gets the n-gram without a block forward; one below it still runs
    the block (and the comparison with this block's own greedy path decides)."""
    hybrid = _hybrid_on_context(tiny_target, ngram_rate=0.01)  # n-gram drafts hopeless: the block
    forwards = []
    block_logits = hybrid.block.block_logits
    hybrid.block.block_logits = lambda batch: forwards.append(len(batch)) or block_logits(batch)
    hybrid.propose([_request(CONTEXT)])
    assert forwards == [1], "the first proposal must draft the block"

    hybrid.prior = _prior(0.99)  # a calibration that trusts n-gram drafts instead
    assert hybrid.propose([_request(CONTEXT)])[0].tokens == [10, 11, 12]
    assert forwards == [1], "the block was drafted although the n-gram beats its typical proposal"
    no_match = [5, 6, 7, 8, 9, 3]
    hybrid.observe("t", torch.randn(len(no_match) - 1, 3 * 32), 0)
    hybrid.propose([DraftRequest("t", no_match, 3, SamplingParams(max_tokens=50), torch.Generator())])
    assert forwards == [1, 1], "a request without an n-gram match must get the block"


def test_ngram_outcomes_come_from_the_requests_own_committed_tokens(tiny_target) -> None:  # noqa: ANN001
    hybrid = _hybrid_on_context(tiny_target, ngram_rate=0.9)
    prior = [0.9] * 4
    assert hybrid.propose([_request(CONTEXT)])[0].tokens == [10, 11, 12]
    # A pipelined draft worker drafts past its proposal before the verifier replies: nothing is
    # committed yet, so no outcome is read and that draft registers none.
    guess = hybrid.propose([_request(CONTEXT + [10, 11, 12], committed=len(CONTEXT))])[0]
    assert guess.tokens and hybrid.ngram_confidence("s", 2, 4) == pytest.approx(prior)
    # The target committed 10, 11, then 7 (the third draft rejected).
    hybrid.propose([_request(CONTEXT + [10, 11, 7])])
    weight = 8  # the prior counts as this many observations
    counts = [(1, 1), (1, 1), (0, 1), (0, 0)]  # (accepted, reached) at positions 1..4
    assert hybrid.ngram_confidence("s", 2, 4) == pytest.approx(
        [(0.9 * weight + a) / (weight + n) for a, n in counts]
    ), "one proposal's outcome, read up to the first rejected draft"
    assert hybrid.ngram_confidence("t", 2, 4) == pytest.approx(prior), "another request saw it"
    hybrid.release("s")
    assert hybrid.ngram_confidence("s", 2, 4) == pytest.approx(prior), "a released request kept its history"


def test_registry_builds_a_hybrid_over_a_trained_drafter(tiny_target, tmp_path) -> None:  # noqa: ANN001
    from specray.workers.drafters.checkpoint import save_drafter_model

    block = _block(tiny_target)
    save_drafter_model(block.model, tmp_path / "d")
    drafter = build_drafter(f"hybrid:{tmp_path / 'd'}", tiny_target)
    assert isinstance(drafter, HybridDrafter) and drafter.feature_layers == block.feature_layers
    assert drafter_feature_layers(f"hybrid:{tmp_path / 'd'}") == block.feature_layers


def test_greedy_hybrid_matches_autoregressive(tiny_target) -> None:  # noqa: ANN001
    prompts = [[5, 9, 17, 33, 5, 9, 17, 40], [7, 7, 8, 60, 61, 3, 12, 7, 8, 60]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = LLMEngine(tiny_target, None, EngineConfig(num_speculative_tokens=0)).generate(prompts, params)
    hybrid = HybridDrafter(_block(tiny_target))
    spec = LLMEngine(tiny_target, hybrid, EngineConfig(num_speculative_tokens=5)).generate(prompts, params)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert hybrid.choices["ngram"] > 0 and hybrid.choices["block"] > 0, hybrid.choices


def test_a_seeded_request_samples_the_same_text_alone_or_in_a_batch(small_vocab_target) -> None:  # noqa: ANN001
    """Its choices read only its own history: requests before it and beside it (here ones that
    repeat themselves, so their n-gram drafts pass) change nothing. A flat target makes the sampled
    text depend on every proposal."""
    prompt = [1, 3, 5, 1, 3]
    others = [[2, 4, 6, 2, 4], [7, 7, 7, 7], [1, 2, 1, 2, 1]]
    seeded = SamplingParams(max_tokens=40, temperature=1.0, seed=1234, ignore_eos=True)

    def run(prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[int], HybridDrafter]:
        hybrid = HybridDrafter(_block(small_vocab_target, seed=2, ngram_rate=0.5))
        engine = LLMEngine(small_vocab_target, hybrid, EngineConfig(num_speculative_tokens=5))
        engine.generate(others, SamplingParams(max_tokens=40, ignore_eos=True))
        return engine.generate(prompts, params)[0].output_ids, hybrid

    alone, hybrid = run([prompt], [seeded])
    assert hybrid.choices["ngram"] > 0 and hybrid.choices["block"] > 0, hybrid.choices
    unseeded = [SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True)] * len(others)
    assert run([prompt, *others], [seeded, *unseeded])[0] == alone, "the batch changed a seeded request"


VOCAB = 8
PROMPT = [1, 3, 5]
LENGTH = 3  # one drafting step after the prefill's token, then the bonus
NUM_SAMPLES = 3000
ALPHA = 1e-3  # a lossless engine fails this seeded test with probability 0.1%


def test_sampled_hybrid_output_follows_the_target(small_vocab_target) -> None:  # noqa: ANN001
    """Sampled requests choose between the n-gram and the block's greedy path, then sample the block
    afresh; choosing by the sampled block would bias its tokens."""
    target = small_vocab_target
    hybrid = HybridDrafter(_block(target, seed=2))
    # A random block's confidences beat the n-gram's uninformed prior; a 99% calibrated rate
    # makes every match win, so both sources are chosen (about 3 in 8 sequences match).
    hybrid.prior = _prior(0.99)
    engine = LLMEngine(
        target,
        hybrid,
        EngineConfig(
            num_speculative_tokens=3, max_num_seqs=256, max_num_batched_tokens=2048, kv_cache_tokens=16384
        ),
    )
    params = SamplingParams(max_tokens=LENGTH, temperature=1.0, ignore_eos=True)
    seqs = engine.generate(
        [PROMPT] * NUM_SAMPLES, [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(NUM_SAMPLES)]
    )
    assert min(hybrid.choices["ngram"], hybrid.choices["block"]) > NUM_SAMPLES // 10, hybrid.choices
    rejected = sum(s.stats.draft_tokens - s.stats.accepted_tokens for s in seqs)
    assert rejected > NUM_SAMPLES // 10, "too few drafts rejected to exercise the residual"
    exact = exact_joint(target, PROMPT, params, LENGTH, VOCAB)
    counts = dict.fromkeys(exact, 0)
    for s in seqs:
        counts[tuple(s.output_ids)] += 1
    assert_follows(counts, exact, ALPHA, "hybrid speculative samples")
