"""The verifier's writes to the session store: behind the replies, many per round trip, best effort.

Redis holds what failover and affinity need (owners, committed tokens, status); generating a token
needs none of it, so no step's replies wait for Redis. Writes are queued in order and one writer
sends everything queued in one pipeline (one round trip for a whole step's sessions), then the
next lot. Two writes are awaited, once per session each: the open (the record names the session's
owners before its first token goes out) and the last step (the record says finished before the last
token goes out). In between the record may lag the tokens delivered by the writes in flight; the
router resumes a failed session from its own copy of the tokens it received, taking from Redis
only what extends it (`router/failover.py`).

When Redis is away (restarted, unreachable) a failed lot is logged and dropped, and the verifier
goes on serving: sessions complete, and only a failover in that window falls back to the router's
copy of the committed tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from specray.cluster.runtime.session_store import SessionStore

logger = logging.getLogger(__name__)


@dataclass
class _Write:
    stage: Callable[[Pipeline], None]  # adds the write's commands to a pipeline
    done: asyncio.Future = field(repr=False)  # set once its lot was sent (or dropped)


class SessionBookkeeping:
    """`SessionStore`'s session writes, queued for one writer task (`run`)."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self._queue: list[_Write] = []
        self._pending = asyncio.Event()  # binds to no loop until used
        self._failing = False  # the last lot failed: say so once, and again when writes succeed

    async def open_session(
        self,
        session_id: str,
        verifier_id: str,
        draft_worker: str,
        prompt_ids: list[int],
        params: dict[str, Any],
        output_ids: list[int],
    ) -> None:
        """Written before it returns: the record names the session's owners from its first token."""
        await self._enqueue(
            lambda pipe: self.store.stage_open(
                pipe, session_id, verifier_id, draft_worker, prompt_ids, params, output_ids
            )
        )

    def record_step(
        self,
        session_id: str,
        output_ids: list[int],
        kv_len: int,
        num_drafts: int,
        accepted: int,
        finish_reason: str | None,
        verify_lengths: list[int],
    ) -> asyncio.Future:
        """Queued; the future is done once the write was sent (a session's last step awaits it)."""
        # Copies: the caller's lists grow with the next steps while this write waits.
        output_ids, verify_lengths = list(output_ids), list(verify_lengths)
        return self._enqueue(
            lambda pipe: self.store.stage_step(
                pipe, session_id, output_ids, kv_len, num_drafts, accepted, finish_reason, verify_lengths
            )
        )

    async def delete_session(self, session_id: str, owner: tuple[str, str]) -> None:
        """After every write queued before it; only while the record still names `owner`."""
        await self._enqueue(lambda pipe: self.store.stage_delete(pipe, session_id, owner))

    def _enqueue(self, stage: Callable[[Pipeline], None]) -> asyncio.Future:
        write = _Write(stage, asyncio.get_running_loop().create_future())
        self._queue.append(write)
        self._pending.set()
        return write.done

    async def run(self) -> None:
        """Send whatever is queued, one pipeline at a time, forever."""
        while True:
            await self._pending.wait()
            self._pending.clear()
            lot, self._queue = self._queue, []
            try:
                async with self.store.redis.pipeline(transaction=True) as pipe:
                    for write in lot:
                        write.stage(pipe)
                    await pipe.execute()
            except (RedisError, OSError) as err:
                if not self._failing:
                    logger.warning("session store writes failed, serving on without them: %s", err)
                    self._failing = True
            else:
                if self._failing:
                    logger.warning("session store writes succeed again")
                    self._failing = False
            finally:
                for write in lot:
                    if not write.done.done():
                        write.done.set_result(None)
