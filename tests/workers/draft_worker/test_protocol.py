"""The draft/verify protocol in one process: a VerifierCore behind LocalChannel, real SmolLM2."""

from __future__ import annotations

import asyncio

import pytest
from local_channel import LocalChannel
from replay_drafter import ReplayDrafter

from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.draft_worker.draft_batcher import DraftBatcher
from specray.workers.draft_worker.session import DraftSessionConfig, VerifyFailed, draft_session
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.protocol import decode_logprobs, decode_params, encode_params
from specray.workers.verifier.core import VerifierCore

PROMPTS = ["List three colors, separated by commas, three times.", "What is the capital of France?"]
PARAMS = SamplingParams(max_tokens=24)


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    engine = LLMEngine(smollm2)
    return [engine.encode_prompt(messages=[{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="module")
def engine_outputs(smollm2, prompt_ids):
    engine = LLMEngine(smollm2, NgramDrafter(), EngineConfig(num_speculative_tokens=5))
    return [s.output_ids for s in engine.generate(prompt_ids, PARAMS)]


async def _generate(
    core: VerifierCore, session_id: str, prompt: list[int], params: SamplingParams
) -> list[int]:
    tokens = []
    async for result in draft_session(
        LocalChannel(core), DraftBatcher(NgramDrafter()), session_id, prompt, params, DraftSessionConfig()
    ):
        tokens += result.tokens
    return tokens


async def _with_loop(core: VerifierCore, coro):
    loop_task = asyncio.create_task(core.run())
    try:
        return await coro
    finally:
        loop_task.cancel()


def test_concurrent_sessions_equal_engine(smollm2, prompt_ids, engine_outputs):
    core = VerifierCore(smollm2, EngineConfig(kv_cache_tokens=4096))

    async def both():
        return await asyncio.gather(*(_generate(core, f"s{i}", p, PARAMS) for i, p in enumerate(prompt_ids)))

    outputs = asyncio.run(_with_loop(core, both()))
    assert outputs == engine_outputs
    assert core.sessions == {} and core.kv_blocks_used == 0
    assert core.steps < 2 * sum(map(len, outputs))  # batched: fewer steps than one per token per session


def test_stale_and_malformed_segments_are_rejected_and_session_continues(smollm2, prompt_ids, engine_outputs):
    core = VerifierCore(smollm2, EngineConfig(kv_cache_tokens=4096))
    prompt = prompt_ids[0]

    async def scenario():
        opened = await core.handle(
            pb.DraftMessage(
                open=pb.OpenSession(session_id="s", token_ids=prompt, params=encode_params(PARAMS))
            )
        )
        first = opened.result.tokens[0]
        committed = len(prompt) + 1
        stale = await core.handle(
            pb.DraftMessage(
                segment=pb.DraftSegment(session_id="s", segment_id=1, committed_len=committed - 1)
            )
        )
        bad_token = await core.handle(
            pb.DraftMessage(
                segment=pb.DraftSegment(session_id="s", segment_id=2, committed_len=committed, tokens=[10**6])
            )
        )
        too_long = await core.handle(
            pb.DraftMessage(
                segment=pb.DraftSegment(
                    session_id="s", segment_id=3, committed_len=committed, tokens=[1] * 99
                )
            )
        )
        unknown = await core.handle(pb.DraftMessage(segment=pb.DraftSegment(session_id="nope", segment_id=1)))
        ok = await core.handle(
            pb.DraftMessage(segment=pb.DraftSegment(session_id="s", segment_id=4, committed_len=committed))
        )
        return first, stale, bad_token, too_long, unknown, ok

    first, stale, bad_token, too_long, unknown, ok = asyncio.run(_with_loop(core, scenario()))
    Code = pb.VerifyError.Code
    assert stale.error.code == Code.STALE and stale.error.committed_len == len(prompt) + 1
    assert bad_token.error.code == Code.INVALID
    assert too_long.error.code == Code.INVALID
    assert unknown.error.code == Code.NOT_OPEN
    # The session went on: the next (valid) segment commits the engine's second token.
    assert [first, *ok.result.tokens] == engine_outputs[0][:2]


def test_bad_open_is_rejected(smollm2):
    core = VerifierCore(smollm2, EngineConfig(kv_cache_tokens=256))

    async def scenario():
        bad_params = await core.handle(
            pb.DraftMessage(open=pb.OpenSession(session_id="a", token_ids=[1, 2], params=pb.SamplingParams()))
        )
        too_big = await core.handle(
            pb.DraftMessage(
                open=pb.OpenSession(
                    session_id="b", token_ids=[1] * 200, params=encode_params(SamplingParams(max_tokens=200))
                )
            )
        )
        return bad_params, too_big

    bad_params, too_big = asyncio.run(_with_loop(core, scenario()))
    assert bad_params.error.code == pb.VerifyError.Code.INVALID and "max_tokens" in bad_params.error.message
    assert too_big.error.code == pb.VerifyError.Code.EXHAUSTED


def test_draft_session_raises_on_verifier_error(smollm2):
    core = VerifierCore(smollm2, EngineConfig(kv_cache_tokens=256))

    async def scenario():
        await _generate(core, "x", [1] * 300, SamplingParams(max_tokens=4))

    with pytest.raises(VerifyFailed, match="EXHAUSTED"):
        asyncio.run(_with_loop(core, scenario()))


def test_sampled_session_is_repeatable(smollm2, prompt_ids):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)

    def once():
        core = VerifierCore(smollm2, EngineConfig(kv_cache_tokens=2048))
        return asyncio.run(_with_loop(core, _generate(core, "r", prompt_ids[1], params)))

    assert once() == once()


class _RecordingNgram(NgramDrafter):
    """n-gram drafting that also records the target features it is sent, as a feature drafter would."""

    feature_layers = (1, 3)

    def __init__(self) -> None:
        super().__init__()
        self.observed: list[tuple[int, int]] = []

    def observe(self, seq_id, features, start):
        self.observed.append((start, features.shape[0]))


def test_features_reach_the_drafter_for_every_committed_position(smollm2, prompt_ids, engine_outputs):
    drafter = _RecordingNgram()
    core = VerifierCore(smollm2, EngineConfig(kv_cache_tokens=2048), drafter.feature_layers)

    batcher = DraftBatcher(drafter)

    async def scenario():
        tokens = []
        session = draft_session(LocalChannel(core), batcher, "f", prompt_ids[0], PARAMS, DraftSessionConfig())
        async for result in session:
            tokens += result.tokens
        return tokens

    assert asyncio.run(_with_loop(core, scenario())) == engine_outputs[0]
    batcher.close()  # the drafting thread has run every observation queued
    # Contiguous from 0: each result covers the positions whose KV it computed and kept.
    position = 0
    for start, rows in drafter.observed:
        assert start == position
        position += rows
    assert position == len(prompt_ids[0]) + len(engine_outputs[0]) - 1


def test_seeded_session_gives_the_same_output_alone_or_batched(smollm2, prompt_ids):
    """Each row draws its own random numbers, so batching with other sessions changes nothing."""
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=11)

    def run(with_neighbour: bool) -> list[int]:
        core = VerifierCore(smollm2, EngineConfig(kv_cache_tokens=2048))

        async def scenario():
            jobs = [_generate(core, "seeded", prompt_ids[0], params)]
            if with_neighbour:
                jobs.append(
                    _generate(core, "other", prompt_ids[1], SamplingParams(max_tokens=16, temperature=1.0))
                )
            return (await asyncio.gather(*jobs))[0]

        return asyncio.run(_with_loop(core, scenario()))

    assert run(False) == run(True)


def test_logprobs_and_penalties_cross_the_protocol(smollm2, prompt_ids):
    """Penalties reach the verifier with the session's params; each VerifyResult carries the
    target's logprob of each of its tokens (and the prefill the prompt's), equal to the engine's."""
    params = SamplingParams(
        max_tokens=10, logprobs=2, prompt_logprobs=1, presence_penalty=0.8, repetition_penalty=1.3
    )
    assert decode_params(encode_params(params)) == params
    (expected,) = LLMEngine(smollm2, NgramDrafter(), EngineConfig(num_speculative_tokens=5)).generate(
        [prompt_ids[0]], params
    )
    core = VerifierCore(smollm2, EngineConfig(kv_cache_tokens=2048))
    # Drafts the engine's own output, every third token wrong: accepted drafts, corrections, bonuses.
    drafter = ReplayDrafter([prompt_ids[0]], [expected.output_ids])

    async def scenario():
        results = []
        session = draft_session(
            LocalChannel(core), DraftBatcher(drafter), "lp", prompt_ids[0], params, DraftSessionConfig()
        )
        async for result in session:
            results.append(result)
        return results

    results = asyncio.run(_with_loop(core, scenario()))
    assert [t for r in results for t in r.tokens] == expected.output_ids
    assert sum(r.accepted for r in results) > 0, "no accepted draft: speculation not exercised"
    logprobs = [lp for r in results for lp in decode_logprobs(r.logprobs)]
    assert all(len(r.logprobs) == len(r.tokens) for r in results)
    assert [lp.token for lp in logprobs] == expected.output_ids
    assert [[t for t, _ in lp.top] for lp in logprobs] == [
        [t for t, _ in lp.top] for lp in expected.output_logprobs
    ]
    for got, want in zip(logprobs, expected.output_logprobs):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
    prompt = decode_logprobs(results[0].prompt_logprobs)
    assert [lp.token for lp in prompt] == prompt_ids[0][1:] and not any(
        r.prompt_logprobs for r in results[1:]
    )
    assert [lp.logprob for lp in prompt] == pytest.approx(
        [lp.logprob for lp in expected.prompt_logprobs], abs=1e-4
    )
