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
    def slot(self) -> Iterator[None]:
        """Hold one of the slots while the block runs; Overloaded when none is free."""
        if self.active >= self.limits.max_concurrent_requests:
            raise Overloaded(
                f"this server is generating {self.active} requests, its limit; retry shortly",
                self.limits.retry_after_s,
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
