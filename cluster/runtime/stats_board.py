"""Replica stats in Redis: how draft-worker and verifier numbers reach the router's `/metrics`.

Draft workers and verifiers run in their own Ray actors (or pods). Each replica writes its counters to
`specray:stats:<pool>:<replica>` every few seconds with a TTL, so a replica that dies drops out; the
router reads them all when Prometheus scrapes it. Redis is already every replica's shared store, and
Ray's own metrics export needs the dashboard agent, which specray does not run.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

logger = logging.getLogger(__name__)
_PREFIX = "specray:stats:"
DRAFT_POOL = "draft_workers"
VERIFIER_POOL = "verifiers"


@dataclass(frozen=True)
class ReplicaReport:
    pool: str
    replica: str
    values: dict[str, float]


class StatsBoard:
    def __init__(self, url: str, interval_s: float = 2.0) -> None:
        # $VARS expand as in SessionStore: the password may come from a Secret-fed variable.
        self.redis = aioredis.from_url(os.path.expandvars(url), decode_responses=True)
        self.interval_s = interval_s
        self.ttl_s = max(1, round(5 * interval_s))  # a few missed writes before a replica drops out

    async def close(self) -> None:
        await self.redis.aclose()

    async def publish(self, pool: str, replica: str, values: dict[str, float]) -> None:
        key = f"{_PREFIX}{pool}:{replica}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=values)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def remove(self, pool: str, replica: str) -> None:
        await self.redis.delete(f"{_PREFIX}{pool}:{replica}")

    async def reports(self) -> list[ReplicaReport]:
        reports = []
        async for key in self.redis.scan_iter(match=_PREFIX + "*"):
            values = await self.redis.hgetall(key)
            if values:  # expired between the scan and the read
                pool, replica = key[len(_PREFIX) :].split(":", 1)
                reports.append(ReplicaReport(pool, replica, {k: float(v) for k, v in values.items()}))
        return sorted(reports, key=lambda r: (r.pool, r.replica))

    async def publish_forever(self, pool: str, replica: str, values: Callable[[], dict[str, float]]) -> None:
        """Publish `values()` every interval until cancelled; a failed write is retried at the next."""
        while True:
            try:
                await self.publish(pool, replica, values())
            except Exception:  # Redis away for a moment
                logger.exception("publishing %s stats failed", replica)
            await asyncio.sleep(self.interval_s)
