"""A step's sessions stay together: before the next step the verifier waits for the sessions it just
answered to send their next segments, within a window of a fraction of its step time, and stops
waiting for a session that closes (a tiny real model, the protocol in one process)."""

from __future__ import annotations

import asyncio

import pytest
from tiny_models import tiny_hf_model

from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.loader import load_model
from specray.workers.protocol import encode_params
from specray.workers.verifier.core import VerifierCore

PROMPTS = [[3, 7, 8, 9], [4, 5, 6, 4, 5]]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gathering")
    tiny_hf_model("llama", path, vocab_size=64, seed=2)
    return load_model(str(path), "float32")


def _open(session_id: str, prompt: list[int]) -> pb.DraftMessage:
    return pb.DraftMessage(
        open=pb.OpenSession(session_id=session_id, token_ids=prompt, params=encode_params(PARAMS))
    )


def _segment(session_id: str, committed: int) -> pb.DraftMessage:
    return pb.DraftMessage(
        segment=pb.DraftSegment(session_id=session_id, segment_id=1, committed_len=committed)
    )


async def _two_sessions_opened_in_one_step(core: VerifierCore) -> list[int]:
    replies = await asyncio.gather(*(core.handle(_open(f"s{i}", p)) for i, p in enumerate(PROMPTS)))
    assert core.steps == 1, "both prefills arrived together and share a step"
    return [r.result.committed_len for r in replies]


def test_a_late_session_joins_the_step_of_the_one_back_first(target):
    core = VerifierCore(target, EngineConfig(kv_cache_tokens=1024))

    async def scenario() -> None:
        loop = asyncio.create_task(core.run())
        try:
            committed = await _two_sessions_opened_in_one_step(core)
            # A slow machine: the window (half a step) is long; the first segment back waits in it.
            core._step_time = core._last_step_time = 60.0
            first = asyncio.create_task(core.handle(_segment("s0", committed[0])))
            await asyncio.sleep(0.2)
            assert core.steps == 1 and not first.done(), "a step started without the other session"
            second = asyncio.create_task(core.handle(_segment("s1", committed[1])))
            replies = await asyncio.wait_for(asyncio.gather(first, second), 30)
            assert [r.WhichOneof("kind") for r in replies] == ["result", "result"]
            assert core.steps == 2, f"{core.steps - 1} steps for two sessions that came back together"
        finally:
            loop.cancel()

    asyncio.run(scenario())


def test_a_session_that_closes_is_not_waited_for(target):
    core = VerifierCore(target, EngineConfig(kv_cache_tokens=1024))

    async def scenario() -> None:
        loop = asyncio.create_task(core.run())
        try:
            committed = await _two_sessions_opened_in_one_step(core)
            core._step_time = core._last_step_time = 60.0
            first = asyncio.create_task(core.handle(_segment("s0", committed[0])))
            await asyncio.sleep(0.2)
            core.close("s1")  # its client went away: no segment is coming
            reply = await asyncio.wait_for(first, 20)  # far less than the 30 s window
            assert reply.WhichOneof("kind") == "result" and core.steps == 2
        finally:
            loop.cancel()

    asyncio.run(scenario())
