"""The verifier's writes to the session store, best effort.

Redis holds what failover needs (committed tokens, owners); generation itself needs none of it. So
when Redis is away (restarted, unreachable) a verifier logs the failed write and goes on serving its
sessions: they complete, and only a failover in that window falls back to the router's own copy of
the committed tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from redis.exceptions import RedisError

from specray.cluster.runtime.session_store import SessionStore

logger = logging.getLogger(__name__)


async def _best_effort(write: Awaitable[None], what: str) -> None:
    try:
        await write
    except (RedisError, OSError) as err:
        logger.warning("session store %s failed, serving on: %s", what, err)


class SessionBookkeeping:
    """`SessionStore`'s session writes, each one logged and dropped when Redis fails."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def open_session(self, *args: object, **kwargs: object) -> None:
        await _best_effort(self.store.open_session(*args, **kwargs), "open")

    async def record_step(self, *args: object, **kwargs: object) -> None:
        await _best_effort(self.store.record_step(*args, **kwargs), "step")

    async def delete_session(self, *args: object, **kwargs: object) -> None:
        await _best_effort(self.store.delete_session(*args, **kwargs), "delete")
