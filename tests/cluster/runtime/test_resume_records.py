"""The Redis records failover reads, on a real Redis: resumed output, owner-checked delete."""

from __future__ import annotations

import asyncio

from specray.cluster.app.redis_server import LocalRedis
from specray.cluster.runtime.session_store import SessionStore


def test_resume_records_on_real_redis():
    async def scenario(url: str) -> None:
        store = SessionStore(url)
        await store.open_session("s", "verifier-a", "draft-a", [1, 2, 3], {"max_tokens": 8})
        await store.record_step("s", [7, 8], kv_len=4, num_drafts=2, accepted=1, finish_reason=None)
        assert await store.committed_output("s", [1, 2, 3]) == [7, 8]
        assert await store.committed_output("s", [1, 2]) is None  # another prompt under this id
        assert await store.committed_output("nope", [1, 2, 3]) is None

        # Resumed on verifier-b through draft-b with the committed output; the old stream's
        # cleanup (verifier-a, draft-a) must not delete the new record, the new owner's may.
        await store.open_session("s", "verifier-b", "draft-b", [1, 2, 3], {"max_tokens": 8}, [7, 8])
        await store.delete_session("s", owner=("verifier-a", "draft-a"))
        assert await store.committed_output("s", [1, 2, 3]) == [7, 8]
        await store.record_step("s", [7, 8, 9], kv_len=5, num_drafts=0, accepted=0, finish_reason="length")
        assert await store.committed_output("s", [1, 2, 3]) is None  # finished: nothing to resume
        await store.delete_session("s", owner=("verifier-b", "draft-b"))
        assert await store.get_session("s") is None
        await store.close()

    with LocalRedis() as server:
        asyncio.run(scenario(server.url))
