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
POLICY = Failover(deadline_s=0.5, backoff_s=0.01, max_backoff_s=0.05)
VERIFIERS = [VerifierInfo("v0", "127.0.0.1:1", 0), VerifierInfo("v1", "127.0.0.1:2", 0)]


class FakeStore:
    def __init__(self, committed: list[int] | None = None) -> None:
        self.committed = committed

    async def committed_output(self, session_id: str, prompt_ids: list[int]) -> list[int] | None:
        return self.committed


def _collect(paths, store=None, policy=POLICY, catch_up=True, registered=lambda attempt: VERIFIERS):
    """Run one request whose attempts stream `paths[i]`; returns (chunks, [(verifier, output_ids)]).

    `registered(attempt)`: the verifiers placement sees at its attempt-th call."""
    opened: list[tuple[str, list[int]]] = []
    placements = 0

    async def place(avoid: set[str], resuming: bool) -> VerifierInfo:
        nonlocal placements
        placements += 1
        live = [v for v in registered(placements) if v.verifier_id not in avoid]
        if not live:
            raise Unavailable("no verifier is registered yet")
        return live[0]

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


def test_the_only_verifier_dies_and_its_replacement_takes_the_session():
    first = [SessionChunk(tokens=[4]), SessionChunk.failure("verifier v0 unreachable", "UNAVAILABLE")]
    second = [SessionChunk(tokens=[5], finished=True, finish_reason="stop")]
    replacement = VerifierInfo("v0-new", "127.0.0.1:3", 0)

    def registered(attempt: int) -> list[VerifierInfo]:
        # The dead verifier's registration lingers, then nothing, then its replacement registers.
        return VERIFIERS[:1] if attempt <= 2 else [] if attempt <= 5 else [replacement]

    chunks, opened = _collect([first, second], registered=registered)
    assert [c.tokens for c in chunks] == [(4,), (5,)]
    assert opened == [("v0", []), ("v0-new", [4])]


def test_gives_up_once_the_deadline_passes_without_progress():
    lost = [SessionChunk.failure("EXHAUSTED: no room in the KV cache", "EXHAUSTED")]
    loop = asyncio.new_event_loop()
    started = loop.time()
    with pytest.raises(Unavailable, match="could not resume within 0.5 s"):
        _collect([lost] * 1000)
    assert loop.time() - started >= 0.5
    loop.close()


def test_progress_gives_a_later_failure_a_whole_deadline_again():
    policy = Failover(deadline_s=0.3, backoff_s=0.1, max_backoff_s=0.1)
    lost = SessionChunk.failure("EXHAUSTED: no room in the KV cache", "EXHAUSTED")
    # Each path delivers a token, then fails; five failures take longer than one deadline.
    paths = [[SessionChunk(tokens=[i]), lost] for i in range(5)]
    paths.append([SessionChunk(tokens=[9], finished=True, finish_reason="length")])
    chunks, opened = _collect(paths, policy=policy)
    assert [c.tokens for c in chunks] == [(0,), (1,), (2,), (3,), (4,), (9,)] and len(opened) == 6
