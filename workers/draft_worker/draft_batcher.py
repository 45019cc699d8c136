"""A draft worker's one drafter, shared by all its sessions: one drafter call per batch of ready
sessions, run off the event loop.

Sessions ask for proposals one at a time each; whatever they ask while the drafter is busy waits
and goes in the next call, all together (the drafter's `propose` takes a list, and a trained
drafter's forward costs about the same for one sequence as for many). The drafter runs in one
thread of its own, so the event loop goes on moving gRPC messages and results meanwhile; every
drafter call (`propose`, `observe`, `release`) goes through that thread in the order made, so a
session's features are observed before its next proposal and the drafter never runs twice at once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from specray.workers.engine.drafter import Drafter, DraftProposal, DraftRequest
from specray.workers.worker_stats import DraftWorkerStats


class DraftBatcher:
    def __init__(self, drafter: Drafter, stats: DraftWorkerStats | None = None) -> None:
        self.drafter = drafter
        self.stats = stats or DraftWorkerStats()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="drafter")
        self._waiting: list[tuple[DraftRequest, asyncio.Future]] = []
        # The task calling the drafter while requests wait (held here: the loop keeps only a
        # weak reference to a task); new requests join its next call.
        self._drain_task: asyncio.Task | None = None

    async def propose(self, request: DraftRequest) -> DraftProposal:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:
        """Queued behind the calls already made; the session's next proposal comes after it."""
        self._thread.submit(self.drafter.observe, seq_id, features, start)

    def release(self, seq_id: str) -> None:
        self._thread.submit(self.drafter.release, seq_id)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            live = [(r, f) for r, f in batch if not f.done()]  # a cancelled session asks no more
            if not live:
                continue
            started = time.perf_counter()
            try:
                proposals = await loop.run_in_executor(
                    self._thread, self.drafter.propose, [r for r, _ in live]
                )
            except Exception as err:  # the drafter failed: each waiting session fails with it
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.stats.record_drafting(len(live), time.perf_counter() - started)
            for (_, future), proposal in zip(live, proposals):
                if not future.done():
                    future.set_result(proposal)

    def close(self) -> None:
        """Run what is queued (observations, releases), then stop the drafting thread."""
        self._thread.shutdown(wait=True)
