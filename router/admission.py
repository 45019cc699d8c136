"""Admission: at most `max_concurrent_requests` generations at once on this router replica.

A request beyond that is refused at once (HTTP 429 / gRPC RESOURCE_EXHAUSTED with Retry-After)
rather than queued: the client, or its load balancer, knows better where to wait or retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from specray.cluster.runtime.limits import RequestLimits
from specray.router.errors import Overloaded


class Admission:
    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.active = 0

    @contextmanager
    def slot(self, count: int = 1) -> Iterator[None]:
        """Hold `count` slots (one per generation: a request's choices) while the block runs;
        Overloaded when fewer are free."""
        if self.active + count > self.limits.max_concurrent_requests:
            raise Overloaded(
                f"this server is generating {self.active} requests of its limit of "
                f"{self.limits.max_concurrent_requests}; retry shortly",
                self.limits.retry_after_s,
            )
        self.active += count
        try:
            yield
        finally:
            self.active -= count
