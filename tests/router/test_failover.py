"""`resumable_chunks` on its own: SessionChunks from fake paths, a fake session store, no cluster."""

from __future__ import annotations

import asyncio

import pytest

from specray.cluster.runtime.failover_config import Failover
from specray.cluster.runtime.session_store import VerifierInfo
from specray.router.errors import RequestError, Unavailable
from specray.router.failover import resumable_chunks
from specray.workers.draft_worker.messages import SessionChunk

PROMPT = [1, 2, 3]
POLICY = Failover(max_resumes=2, backoff_s=0.0)
VERIFIERS = [VerifierInfo("v0", "127.0.0.1:1", 0), VerifierInfo("v1", "127.0.0.1:2", 0)]


class FakeStore:
    def __init__(self, committed: list[int] | None = None) -> None:
        self.committed = committed

    async def committed_output(self, session_id: str, prompt_ids: list[int]) -> list[int] | None:
        return self.committed


def _collect(paths, store=None, policy=POLICY, catch_up=True):
    """Run one request whose attempts stream `paths[i]`; returns (chunks, [(verifier, output_ids)])."""
    opened: list[tuple[str, list[int]]] = []

    async def place(avoid: set[str], resuming: bool) -> VerifierInfo:
        return next(v for v in VERIFIERS if v.verifier_id not in avoid)

    async def open_path(verifier: VerifierInfo, output_ids: list[int]):
        opened.append((verifier.verifier_id, list(output_ids)))
        for chunk in paths[len(opened) - 1]:
            yield chunk

    async def run():
        return [
            c
            async for c in resumable_chunks(
                "s", PROMPT, place, open_path, store or FakeStore(), policy, catch_up=catch_up
            )
        ]

    return asyncio.run(run()), opened


def test_chunks_pass_through_until_finished():
    path = [
        SessionChunk(tokens=[4]),
        SessionChunk(tokens=[5, 6], num_drafts=2, accepted=1),
        SessionChunk(tokens=[7], finished=True, finish_reason="length"),
    ]
    chunks, opened = _collect([path])
    assert chunks == path and opened == [("v0", [])]


def test_unavailable_verifier_resumes_elsewhere_with_the_stored_output():
    first = [SessionChunk(tokens=[4]), SessionChunk.failure("verifier v0 unreachable", "UNAVAILABLE")]
    second = [SessionChunk(tokens=[6], finished=True, finish_reason="stop")]
    # Redis committed token 5 before v0 died; the router never received it.
    chunks, opened = _collect([first, second], FakeStore([4, 5]))
    assert [c.tokens for c in chunks] == [(4,), (5,), (6,)]
    catch_up = chunks[1]
    assert (catch_up.num_drafts, catch_up.accepted, catch_up.finished) == (0, 0, False)
    assert opened == [("v0", []), ("v1", [4, 5])]


def test_without_catch_up_the_undelivered_tokens_are_generated_again():
    """A request with logprobs: Redis has token 5 but not its logprob, so the new path redoes it."""
    first = [SessionChunk(tokens=[4]), SessionChunk.failure("verifier v0 unreachable", "UNAVAILABLE")]
    second = [SessionChunk(tokens=[5, 6], finished=True, finish_reason="stop")]
    chunks, opened = _collect([first, second], FakeStore([4, 5]), catch_up=False)
    assert [c.tokens for c in chunks] == [(4,), (5, 6)]
    assert opened == [("v0", []), ("v1", [4])]


def test_client_error_is_the_request_s():
    with pytest.raises(RequestError, match="bad"):
        _collect([[SessionChunk.failure("bad", "INVALID")]])


def test_gives_up_after_max_resumes():
    lost = [SessionChunk.failure("EXHAUSTED: no room in the KV cache", "EXHAUSTED")]
    with pytest.raises(Unavailable, match="after 2 resumes"):
        _collect([lost, lost, lost])
