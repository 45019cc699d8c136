"""The draft worker's batcher: sessions ready together share one drafter call, those asking while it
runs share the next; the drafter runs in one thread, one call at a time, in the order calls were
made; a session that stops waiting is not drafted for."""

from __future__ import annotations

import asyncio
import threading

import torch

from specray.workers.draft_worker.draft_batcher import DraftBatcher
from specray.workers.engine.drafter import Drafter, DraftProposal, DraftRequest
from specray.workers.engine.sampling import SamplingParams
from specray.workers.worker_stats import DraftWorkerStats


class _GatedDrafter(Drafter):
    """Proposes [len(context)] * max_tokens; each call waits for the test to open its gate, and
    every call is logged with the thread it ran in."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[tuple[str, object]] = []
        self.threads: set[str] = set()
        self._busy = threading.Lock()

    def _enter(self, kind: str, what: object) -> None:
        assert self._busy.acquire(blocking=False), "the drafter was called while already running"
        self.threads.add(threading.current_thread().name)
        self.calls.append((kind, what))

    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        self._enter("propose", [r.seq_id for r in requests])
        self.gate.wait(10)
        self._busy.release()
        return [DraftProposal([len(r.token_ids)] * r.max_tokens) for r in requests]

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:
        self._enter("observe", seq_id)
        self._busy.release()

    def release(self, seq_id: str) -> None:
        self._enter("release", seq_id)
        self._busy.release()


def _request(seq_id: str, context: int, max_tokens: int = 2) -> DraftRequest:
    return DraftRequest(seq_id, list(range(context)), max_tokens, SamplingParams(), torch.Generator())


def test_ready_sessions_share_a_call_and_latecomers_share_the_next():
    drafter = _GatedDrafter()
    stats = DraftWorkerStats()
    batcher = DraftBatcher(drafter, stats)

    async def scenario() -> list[DraftProposal]:
        first = [asyncio.ensure_future(batcher.propose(_request(f"s{i}", 3 + i))) for i in range(3)]
        await asyncio.sleep(0.2)  # the first call is running (its gate is shut)
        late = [asyncio.ensure_future(batcher.propose(_request(f"s{i}", 10 + i, 1))) for i in range(3, 5)]
        cancelled = asyncio.ensure_future(batcher.propose(_request("gone", 1)))
        await asyncio.sleep(0.05)
        cancelled.cancel()  # its session stopped waiting before its call
        drafter.gate.set()
        return await asyncio.gather(*first, *late)

    proposals = asyncio.run(scenario())
    batcher.close()
    assert [p.tokens for p in proposals] == [[3, 3], [4, 4], [5, 5], [13], [14]], "proposals mixed up"
    assert drafter.calls == [("propose", ["s0", "s1", "s2"]), ("propose", ["s3", "s4"])]
    assert (stats.drafter_calls, stats.drafter_proposals) == (2, 5) and stats.drafter_seconds > 0
    assert len(drafter.threads) == 1 and threading.current_thread().name not in drafter.threads


def test_observations_and_releases_keep_their_order_with_proposals():
    drafter = _GatedDrafter()
    drafter.gate.set()
    batcher = DraftBatcher(drafter)

    async def scenario() -> None:
        batcher.observe("a", torch.zeros(2, 4), 0)
        await batcher.propose(_request("a", 5))
        batcher.release("a")

    asyncio.run(scenario())
    batcher.close()  # runs what is still queued
    assert drafter.calls == [("observe", "a"), ("propose", ["a"]), ("release", "a")]


def test_a_failing_drafter_fails_the_sessions_of_its_call():
    class Broken(_GatedDrafter):
        def propose(self, requests):
            raise RuntimeError("drafter out of order")

    batcher = DraftBatcher(Broken())

    async def scenario() -> list[object]:
        return await asyncio.gather(
            *(batcher.propose(_request(f"s{i}", 2)) for i in range(2)), return_exceptions=True
        )

    outcomes = asyncio.run(scenario())
    batcher.close()
    assert [str(o) for o in outcomes] == ["drafter out of order"] * 2
