"""Replica stats in Redis: how draft-worker and verifier numbers reach the router's `/metrics`.

Draft workers and verifiers run in their own Ray actors (or pods). Each replica writes its counters to
`specray:stats:<pool>:<replica>` every few seconds with a TTL, so a replica that dies drops out; the
router reads them all when Prometheus scrapes it. Redis is already every replica's shared store, and
Ray's own metrics export needs the dashboard agent, which specray does not run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from specray.cluster.runtime.redis_client import OutageLog, connect

logger = logging.getLogger(__name__)
STATS_PREFIX = "specray:stats:"
# Serve's view of the deployments (status and replicas per state, JSON), which `specray serve`
# refreshes for `specray status`; it expires when the launcher stops refreshing it.
SERVE_STATUS_KEY = "specray:serve:deployments"
DRAFT_POOL = "draft_workers"
VERIFIER_POOL = "verifiers"


@dataclass(frozen=True)
class ReplicaReport:
    pool: str
    replica: str
    values: dict[str, float]


class StatsBoard:
    def __init__(self, url: str, interval_s: float = 2.0) -> None:
        self.redis = connect(url)
        self.interval_s = interval_s
        self.ttl_s = max(1, round(5 * interval_s))  # a few missed writes before a replica drops out

    async def close(self) -> None:
        await self.redis.aclose()

    async def publish(self, pool: str, replica: str, values: dict[str, float]) -> None:
        key = f"{STATS_PREFIX}{pool}:{replica}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=values)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def remove(self, pool: str, replica: str) -> None:
        await self.redis.delete(f"{STATS_PREFIX}{pool}:{replica}")

    async def reports(self) -> list[ReplicaReport]:
        reports = []
        async for key in self.redis.scan_iter(match=STATS_PREFIX + "*"):
            values = await self.redis.hgetall(key)
            if values:  # expired between the scan and the read
                pool, replica = key[len(STATS_PREFIX) :].split(":", 1)
                reports.append(ReplicaReport(pool, replica, {k: float(v) for k, v in values.items()}))
        return sorted(reports, key=lambda r: (r.pool, r.replica))

    async def publish_forever(self, pool: str, replica: str, values: Callable[[], dict[str, float]]) -> None:
        """Publish `values()` every interval until cancelled; a failed write is retried at the next."""
        outage = OutageLog(logger, f"{replica} stats")
        while True:
            try:
                await self.publish(pool, replica, values())
                outage.succeeded()
            except RedisError as err:  # Redis away for a moment
                outage.failed(err)
            await asyncio.sleep(self.interval_s)
