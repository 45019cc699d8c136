"""The verifier's scheduling in one process (VerifierCore, LocalChannel, a tiny real model): the
survival-ordered queue, Algorithm 1 budgets per step, the budget reported to draft sessions."""

from __future__ import annotations

import asyncio

import pytest
from local_channel import LocalChannel
from tiny_models import tiny_hf_model

from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.draft_worker.draft_batcher import DraftBatcher
from specray.workers.draft_worker.session import DraftSessionConfig, draft_session
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.engine.step_curve import StepCurve
from specray.workers.models.loader import load_model
from specray.workers.protocol import encode_params
from specray.workers.verifier.core import VerifierCore

PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)
PROMPTS = [[3, 7, 8, 9, 7, 8, 9, 7, 8], [4, 5, 6, 4, 5, 6, 4], [10, 11, 12, 13, 10, 11], [20, 21, 20, 21]]
# Appendix A's curve: one draft of survival 0.8 is not worth its slow-down.
STEEP = StepCurve((1, 2, 3), (1.0, 0.5, 0.45))
FLAT = StepCurve((1, 64), (5.0, 5.0))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_verifier")
    tiny_hf_model("llama", path, vocab_size=64, seed=1)
    return load_model(str(path), "float32")


def _open(session_id: str, prompt: list[int]) -> pb.DraftMessage:
    return pb.DraftMessage(
        open=pb.OpenSession(session_id=session_id, token_ids=prompt, params=encode_params(PARAMS))
    )


def _segment(session_id: str, committed: int, tokens: list[int], confidence: list[float]) -> pb.DraftMessage:
    return pb.DraftMessage(
        segment=pb.DraftSegment(
            session_id=session_id,
            segment_id=1,
            committed_len=committed,
            tokens=tokens,
            confidence=confidence,
        )
    )


async def _opened(core: VerifierCore, n: int) -> list[int]:
    """Open n sessions through the batching loop; their committed lengths."""
    loop = asyncio.create_task(core.run())
    try:
        replies = await asyncio.gather(*(core.handle(_open(f"s{i}", PROMPTS[i])) for i in range(n)))
    finally:
        loop.cancel()
    return [r.result.committed_len for r in replies]


def test_queue_orders_by_survival_then_waiting_time(target):
    core = VerifierCore(target, EngineConfig(max_num_seqs=1, kv_cache_tokens=2048))

    async def scenario() -> list[list[str]]:
        committed = await _opened(core, 4)
        survival = {"s0": [0.2, 0.2], "s1": [0.9, 0.9], "s2": [0.6, 0.6]}
        pending = [
            asyncio.create_task(core.handle(_segment(sid, committed[int(sid[1])], [5, 6], cs)))
            for sid, cs in survival.items()
        ]
        await asyncio.sleep(0)  # the segments reach the queue
        order = [[j.seq.seq_id for j in core._take_batch()]]
        # s3 arrives with the highest survival, but s2 and s0 have waited a step: they go first.
        pending.append(asyncio.create_task(core.handle(_segment("s3", committed[3], [5, 6], [1.0, 1.0]))))
        await asyncio.sleep(0)
        order += [[j.seq.seq_id for j in core._take_batch()] for _ in range(3)]
        for task in pending:
            task.cancel()
        return order

    assert asyncio.run(scenario()) == [["s1"], ["s2"], ["s0"], ["s3"]]


@pytest.mark.parametrize(
    "scheduling,curve,verified,budget",
    [("confidence", STEEP, 0, 1), ("confidence", FLAT, 3, 4), ("fixed", None, 3, 4), ("off", None, 0, 0)],
)
def test_step_verifies_the_scheduled_prefix_and_reports_a_budget(target, scheduling, curve, verified, budget):
    config = EngineConfig(
        num_speculative_tokens=4, kv_cache_tokens=2048, scheduling=scheduling, step_curve=curve
    )
    core = VerifierCore(target, config)

    async def scenario() -> pb.VerifyResult:
        (committed,) = await _opened(core, 1)
        loop = asyncio.create_task(core.run())
        try:
            reply = await core.handle(_segment("s0", committed, [5, 6, 7], [0.8, 0.9, 0.9]))
        finally:
            loop.cancel()
        return reply.result

    result = asyncio.run(scenario())
    assert (result.num_proposed, result.num_drafts, result.verify_budget) == (3, verified, budget)
    assert len(result.tokens) == result.accepted + 1 and result.accepted <= verified
    counters = core.counters
    assert (counters.segments, counters.proposed_drafts, counters.verified_drafts) == (1, 3, verified)
    assert core.sessions["s0"].stats.draft_tokens == verified


def test_malformed_confidences_are_rejected(target):
    core = VerifierCore(target, EngineConfig(kv_cache_tokens=2048, scheduling="confidence", step_curve=FLAT))

    async def scenario() -> list[pb.VerifyMessage]:
        (committed,) = await _opened(core, 1)
        return [await core.handle(_segment("s0", committed, [5, 6], cs)) for cs in ([0.5], [0.5, 1.5])]

    for reply in asyncio.run(scenario()):
        assert reply.error.code == pb.VerifyError.Code.INVALID


def test_draft_sessions_follow_the_budget_and_equal_autoregressive(target):
    reference = LLMEngine(target, None, EngineConfig(num_speculative_tokens=0)).generate(PROMPTS, PARAMS)
    # Steep enough that the n-gram prior (0.7) gets some drafts verified, not all: 3 drafts for one
    # session alone, 2 and 1 for two, 1 each for three, 1 in all for four (budgets move with load).
    curve = StepCurve((1, 8), (1.0, 0.4))
    config = EngineConfig(
        num_speculative_tokens=5,
        kv_cache_tokens=4096,
        scheduling="confidence",
        step_curve=curve,
        confidence_prior=0.7,
    )
    core = VerifierCore(target, config)

    async def one(i: int) -> list[pb.VerifyResult]:
        session = draft_session(
            LocalChannel(core),
            DraftBatcher(NgramDrafter()),
            f"s{i}",
            PROMPTS[i],
            PARAMS,
            DraftSessionConfig(5, 256),
        )
        return [result async for result in session]

    async def all_sessions() -> list[list[pb.VerifyResult]]:
        loop = asyncio.create_task(core.run())
        try:
            return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        finally:
            loop.cancel()

    sessions = asyncio.run(all_sessions())
    assert [[t for r in results for t in r.tokens] for results in sessions] == [
        s.output_ids for s in reference
    ]
    steps = [(prev, r) for results in sessions for prev, r in zip(results, results[1:])]
    # Each segment stays within the budget its session was given by the previous result.
    assert all(r.num_proposed <= prev.verify_budget for prev, r in steps)
    assert all(r.num_drafts <= r.num_proposed for _, r in steps)
    counters = core.counters
    assert 0 < counters.verified_drafts < counters.proposed_drafts  # the scheduler cut some tails
    assert counters.accepted_drafts > 0
