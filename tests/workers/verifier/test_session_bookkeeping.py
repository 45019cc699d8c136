"""The verifier's session writes on a real Redis: queued behind the replies, sent many to a round
trip in the order they were made, the open and the last step awaited; with Redis gone, writes are
dropped and nothing waits on them forever."""

from __future__ import annotations

import asyncio
import json

from specray.cluster.app.redis_server import LocalRedis
from specray.cluster.runtime.session_store import SessionStore
from specray.workers.verifier.session_bookkeeping import SessionBookkeeping


def test_steps_are_written_behind_in_order_and_in_few_round_trips():
    async def scenario(url: str) -> None:
        store = SessionStore(url)
        bookkeeping = SessionBookkeeping(store)
        writer = asyncio.create_task(bookkeeping.run())

        async def transactions() -> int:  # each pipeline is one MULTI/EXEC round trip
            return (await store.redis.info("commandstats")).get("cmdstat_exec", {}).get("calls", 0)

        try:
            await bookkeeping.open_session("s", "verifier-a", "draft-a", [1, 2], {"max_tokens": 9}, [])
            assert (await store.get_session("s"))["verifier"] == "verifier-a", "the open is awaited"
            output, lengths = [], []
            steps = []
            for token in range(5):  # five steps queued at once, as replies go out without waiting
                output.append(token)
                lengths.append(1)
                steps.append(bookkeeping.record_step("s", output, len(output), 1, 1, None, lengths))
            output.append(99)  # the caller's list grows on: each write keeps what it was given
            before = await transactions()
            await asyncio.gather(*steps)
            round_trips = await transactions() - before
            record = await store.get_session("s")
            assert json.loads(record["output_ids"]) == [0, 1, 2, 3, 4], "the last write does not win"
            assert record["verify_steps"] == "5" and json.loads(record["verify_lengths"]) == [1] * 5
            assert round_trips == 1, f"{round_trips} round trips for five steps queued together"
            await bookkeeping.record_step("s", [0, 1, 2, 3, 4, 5], 6, 0, 0, "length", [1] * 6)
            assert (await store.get_session("s"))["status"] == "finished"
            await bookkeeping.delete_session("s", owner=("verifier-a", "draft-a"))
            assert await store.get_session("s") is None
        finally:
            writer.cancel()
            await store.close()

    with LocalRedis() as server:
        asyncio.run(scenario(server.url))


def test_with_redis_gone_writes_are_dropped_and_awaiting_them_returns(caplog):
    async def scenario(url: str) -> None:
        store = SessionStore(url, session_ttl_s=30)
        store.redis.connection_pool.connection_kwargs.update(socket_connect_timeout=0.5)
        bookkeeping = SessionBookkeeping(store)
        writer = asyncio.create_task(bookkeeping.run())
        try:
            await asyncio.wait_for(
                bookkeeping.open_session("s", "verifier-a", "draft-a", [1], {"max_tokens": 2}, []), 30
            )
            await asyncio.wait_for(bookkeeping.record_step("s", [5], 1, 0, 0, "length", []), 30)
        finally:
            writer.cancel()
            await store.close()

    with LocalRedis() as server:
        url = server.url
    asyncio.run(scenario(url))  # the server is stopped: every write fails
    failures = [r for r in caplog.records if "session store writes failed" in r.getMessage()]
    assert len(failures) == 1, "an outage is reported once, not per write"
