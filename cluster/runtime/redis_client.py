"""The one way the cluster's roles connect to Redis: bounded waits, and reconnecting by itself.

A pooled connection that Redis closed (a restart, a failover, an idle timeout) fails its next
command with ConnectionError; retrying it on a fresh connection (with a short backoff) makes a
Redis restart invisible to callers once Redis is back. `redis.asyncio.from_url` retries nothing
by default, hence the explicit policy. Timeouts are not retried: a Redis that stopped answering
should fail the call after one timeout, not several.
"""

from __future__ import annotations

import logging
import os
import urllib.parse

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

REDIS_TIMEOUT_S = 5.0
RETRIES = 3  # after the stale connection's error: reconnect, then twice more while Redis restarts


def connect(url: str, timeout_s: float = REDIS_TIMEOUT_S) -> aioredis.Redis:
    """A client for `url` (strings, not bytes); $VARS in it expand, so a deployment can keep the
    password in a Secret-fed variable rather than in the URL."""
    return aioredis.from_url(
        os.path.expandvars(url),
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(
            ExponentialBackoff(cap=1.0, base=0.05), RETRIES, supported_errors=(RedisConnectionError,)
        ),
    )


def redacted(url: str) -> str:
    """`url` ($VARS expanded) with its password masked, for consoles and reports."""
    parts = urllib.parse.urlsplit(os.path.expandvars(url))
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return parts.geturl()


class OutageLog:
    """Says once that Redis became unreachable for `what` (not at every retry), and when it is back."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.down = False

    def failed(self, err: RedisError) -> None:
        if not self.down:
            self.logger.warning("%s: Redis unreachable (%s); retrying", self.what, err)
            self.down = True

    def succeeded(self) -> None:
        if self.down:
            self.logger.warning("%s: Redis reachable again", self.what)
            self.down = False
