"""A verifier checks every number a draft worker sends, and a session can resume from its output.

One process, a VerifierCore on the tiny random target behind the real protocol messages.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from local_channel import LocalChannel

from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.draft_worker.draft_batcher import DraftBatcher
from specray.workers.draft_worker.session import DraftSessionConfig, draft_session
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.sampling import SamplingParams
from specray.workers.protocol import encode_params, encode_tensor
from specray.workers.verifier.core import VerifierCore

Code = pb.VerifyError.Code
PROMPT = [5, 17, 33, 17, 33, 8, 60, 17, 33]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


async def _with_loop(core: VerifierCore, coro):
    loop_task = asyncio.create_task(core.run())
    try:
        return await coro
    finally:
        loop_task.cancel()


def _open(session_id: str, params: SamplingParams, tokens: list[int] = PROMPT, prompt_len: int = 0):
    return pb.DraftMessage(
        open=pb.OpenSession(
            session_id=session_id, token_ids=tokens, params=encode_params(params), prompt_len=prompt_len
        )
    )


def _segment(session_id: str, segment_id: int, committed: int, tokens: list[int], **fields):
    return pb.DraftMessage(
        segment=pb.DraftSegment(
            session_id=session_id, segment_id=segment_id, committed_len=committed, tokens=tokens, **fields
        )
    )


def _probs(rows: int, vocab: int) -> torch.Tensor:
    return torch.full((rows, vocab), 1.0 / vocab)


def test_bad_probabilities_and_confidences_are_refused_and_the_session_goes_on(tiny_target):
    core = VerifierCore(tiny_target, EngineConfig(kv_cache_tokens=512))
    vocab = tiny_target.config.vocab_size
    drafts = [3, 4]
    nan = _probs(2, vocab)
    nan[1, 7] = math.nan
    negative = _probs(2, vocab)
    negative[0, 9] = -0.5
    above_one = _probs(2, vocab)
    above_one[0, 0] = 1.5
    unnormalized = _probs(2, vocab) * 2
    zero_for_draft = _probs(2, vocab)
    zero_for_draft[1] = 0.0
    zero_for_draft[1, 0] = 1.0  # a distribution, but the drafted token 4 has no mass
    bad_probs = [nan, negative, above_one, unnormalized, zero_for_draft, _probs(3, vocab)]
    bad_confidence = [[0.5], [math.nan, 0.5], [1.5, 0.5], [-0.1, 0.5]]

    async def scenario():
        opened = await core.handle(_open("s", GREEDY))
        committed = len(PROMPT) + 1
        replies = [
            await core.handle(_segment("s", i, committed, drafts, draft_probs=encode_tensor(p)))
            for i, p in enumerate(bad_probs, 1)
        ]
        replies += [
            await core.handle(_segment("s", 10 + i, committed, drafts, confidence=c))
            for i, c in enumerate(bad_confidence)
        ]
        good = await core.handle(
            _segment("s", 20, committed, drafts, draft_probs=encode_tensor(_probs(2, vocab)))
        )
        return opened, replies, good

    opened, replies, good = asyncio.run(_with_loop(core, scenario()))
    assert opened.WhichOneof("kind") == "result"
    for reply in replies:
        assert reply.error.code == Code.INVALID, reply
        assert reply.error.committed_len == len(PROMPT) + 1  # nothing was committed
    assert good.WhichOneof("kind") == "result" and good.result.committed_len > len(PROMPT) + 1


async def _generate(
    core: VerifierCore, params: SamplingParams, resumed: list[int] | None = None
) -> list[int]:
    tokens = []
    session = draft_session(
        LocalChannel(core),
        DraftBatcher(NgramDrafter()),
        "r",
        PROMPT,
        params,
        DraftSessionConfig(),
        resumed_output=resumed,
    )
    async for result in session:
        tokens += result.tokens
    return tokens


def test_a_resumed_session_continues_the_uninterrupted_output(tiny_target):
    def run(resumed: list[int] | None) -> list[int]:
        core = VerifierCore(tiny_target, EngineConfig(kv_cache_tokens=512))
        return asyncio.run(_with_loop(core, _generate(core, GREEDY, resumed)))

    whole = run(None)
    assert len(whole) == GREEDY.max_tokens
    for cut in (1, 7, GREEDY.max_tokens - 1):
        # A fresh verifier re-prefills prompt + the first `cut` tokens and goes on from there.
        assert run(whole[:cut]) == whole[cut:], cut


@pytest.mark.parametrize(
    ("tokens", "prompt_len", "problem"),
    [
        (PROMPT, len(PROMPT) + 1, "prompt_len"),
        (PROMPT + [1] * GREEDY.max_tokens, len(PROMPT), "already"),
    ],
)
def test_a_resume_that_leaves_no_room_is_refused(tiny_target, tokens, prompt_len, problem):
    core = VerifierCore(tiny_target, EngineConfig(kv_cache_tokens=512))
    reply = asyncio.run(_with_loop(core, core.handle(_open("x", GREEDY, tokens, prompt_len))))
    assert reply.error.code == Code.INVALID and problem in reply.error.message
    assert core.sessions == {}


def test_another_sessions_draft_probabilities_do_not_change_acceptance(tiny_target):
    """A deterministic drafter's sampled session batched with a session that sends p_d gets
    exactly what it gets alone (its p_d stays one-hot, not zero)."""
    vocab = tiny_target.config.vocab_size
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    drafts = [40, 41, 42]  # arbitrary: the target rarely agrees, so acceptance depends on p_d

    async def scenario(with_neighbour: bool):
        core = VerifierCore(tiny_target, EngineConfig(kv_cache_tokens=512))
        loop_task = asyncio.create_task(core.run())
        try:
            await core.handle(_open("a", sampled))
            segments = [core.handle(_segment("a", 1, len(PROMPT) + 1, drafts))]
            if with_neighbour:
                await core.handle(_open("b", sampled))
                probs = encode_tensor(_probs(3, vocab))
                segments.append(core.handle(_segment("b", 1, len(PROMPT) + 1, drafts, draft_probs=probs)))
            replies = await asyncio.gather(*segments)
            return replies[0], core.steps
        finally:
            loop_task.cancel()

    alone, _ = asyncio.run(scenario(False))
    batched, steps = asyncio.run(scenario(True))
    assert steps == 3  # two prefills, then both segments in one step
    assert batched.WhichOneof("kind") == "result"
    assert (batched.result.accepted, list(batched.result.tokens)) == (
        alone.result.accepted,
        list(alone.result.tokens),
    )
