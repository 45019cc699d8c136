"""The roles' Redis clients against a real Redis server that restarts: no call fails on a pooled
connection the restart closed; a verifier's registration expires within its TTL."""

from __future__ import annotations

import asyncio

import pytest

from specray.cluster.app.redis_server import LocalRedis
from specray.cluster.runtime.session_store import VERIFIER_TTL_S, SessionStore
from specray.cluster.runtime.stats_board import StatsBoard


@pytest.fixture
def redis_server():
    server = LocalRedis().start()
    yield server
    server.stop()


async def _burst(store: SessionStore, board: StatsBoard, n: int) -> list[BaseException]:
    calls = [store.live_verifiers() for _ in range(n)] + [store.get_session(f"s{i}") for i in range(n)]
    calls += [board.reports() for _ in range(n)]
    return [r for r in await asyncio.gather(*calls, return_exceptions=True) if isinstance(r, BaseException)]


def test_clients_recover_by_themselves_after_a_restart(redis_server):
    async def run() -> list[BaseException]:
        store, board = SessionStore(redis_server.url), StatsBoard(redis_server.url)
        try:
            await store.heartbeat_verifier("v", "127.0.0.1:1", 0)
            assert await _burst(store, board, 20) == []  # the pools now hold many connections
            redis_server.stop()
            redis_server.start()  # same port, empty: every pooled connection is stale
            return await _burst(store, board, 20)
        finally:
            await store.close()
            await board.close()

    assert asyncio.run(run()) == []


def test_a_silent_verifier_drops_out_within_its_ttl(redis_server):
    async def run() -> tuple[int, int]:
        store = SessionStore(redis_server.url)
        try:
            await store.heartbeat_verifier("v", "127.0.0.1:1", 0)
            registered = len(await store.live_verifiers())
            await asyncio.sleep(VERIFIER_TTL_S + 0.5)  # no heartbeat: as if it died
            return registered, len(await store.live_verifiers())
        finally:
            await store.close()

    assert asyncio.run(run()) == (1, 0)
