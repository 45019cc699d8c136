"""Failover: a request whose verifier or draft worker dies goes on elsewhere, losing no token.

The verifier writes every step's committed tokens to Redis before it answers, so Redis holds at
least what the router has received. When the path fails — the draft worker reports its verifier
unreachable, or the draft worker itself dies (a Ray error on its stream) — the router waits a moment,
takes from Redis any committed tokens it had not received yet (while the record is still this
request's and running), and opens the session again: on a live verifier other than a failed one,
through whichever draft worker Serve picks, with the committed output after the prompt. The new
verifier re-prefills prompt + output and generation goes on. Greedy output is unchanged; sampled
output remains a sample of the target's distribution (its random stream restarts at the resume).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from ray.exceptions import RayError
from redis.exceptions import RedisError

from specray.cluster.runtime.failover_config import Failover
from specray.cluster.runtime.session_store import SessionStore, VerifierInfo
from specray.router.errors import RequestError, Unavailable
from specray.workers.draft_worker.messages import SessionChunk

logger = logging.getLogger(__name__)

# Verifier error codes that the request itself caused; the others (full KV cache, verifier gone,
# a failed step) are the path's, and the request may go on elsewhere.
CLIENT_ERRORS = frozenset({"INVALID", "STALE", "NOT_OPEN"})

# (avoid these verifier ids, resuming?) -> the verifier to use
Place = Callable[[set[str], bool], Awaitable[VerifierInfo]]
# (verifier, committed output so far) -> the draft worker's chunks for that path
OpenPath = Callable[[VerifierInfo, list[int]], AsyncIterator[SessionChunk]]


class _PathLost(Exception):
    def __init__(self, message: str, failed_verifier: str | None) -> None:
        super().__init__(message)
        self.failed_verifier = failed_verifier  # avoided when resuming, when the verifier was at fault


async def resumable_chunks(
    session_id: str,
    prompt_ids: list[int],
    place: Place,
    open_path: OpenPath,
    store: SessionStore,
    policy: Failover,
    catch_up: bool = True,
) -> AsyncIterator[SessionChunk]:
    """The draft worker's chunks for one request, resumed after failures (at most policy.max_resumes).

    `catch_up=False` resumes from the tokens received rather than from Redis: tokens committed but
    never delivered come without their logprobs (Redis keeps none), so a request that asked for
    logprobs has them generated again; they were never sent, so the output stays a valid sample.
    """
    received: list[int] = []
    avoid: set[str] = set()
    lost: Exception | None = None
    for attempt in range(policy.max_resumes + 1):
        resuming = attempt > 0
        if resuming:
            await asyncio.sleep(policy.backoff_s * 2 ** (attempt - 1))
        if resuming and catch_up:
            ahead = await _ahead_in_store(store, session_id, prompt_ids, received)
            if ahead:
                received += ahead
                yield _catch_up(ahead)
        try:
            verifier = await place(avoid, resuming)
        except Unavailable as err:
            if not resuming:
                raise
            lost = err  # e.g. the only verifier died and its replacement is not registered yet
            continue
        try:
            async with aclosing(open_path(verifier, received)) as chunks:
                opened = False
                async for chunk in chunks:
                    if chunk.failed:
                        # A resumed open may race the old stream's cleanup ("already open"): retry.
                        if chunk.code in CLIENT_ERRORS and (opened or not resuming):
                            raise RequestError(chunk.error)
                        failed = verifier.verifier_id if chunk.code == "UNAVAILABLE" else None
                        raise _PathLost(chunk.error, failed)
                    opened = True
                    received += chunk.tokens
                    yield chunk
                    if chunk.finished:
                        return
        except RayError as err:  # the draft worker died or was removed mid-request
            lost = err
        except _PathLost as err:
            lost = err
            if err.failed_verifier is not None:
                avoid.add(err.failed_verifier)
        logger.warning("session %s lost its path after %d tokens: %s", session_id, len(received), lost)
    raise Unavailable(f"generation failed after {policy.max_resumes} resumes: {lost}")


async def _ahead_in_store(
    store: SessionStore, session_id: str, prompt_ids: list[int], received: list[int]
) -> list[int]:
    """Committed tokens Redis holds beyond those received (a reply lost with its verifier)."""
    try:
        committed = await store.committed_output(session_id, prompt_ids)
    except RedisError:
        return []  # Redis is away too: resume from what the router has
    if committed is None or committed[: len(received)] != received:
        return []
    return committed[len(received) :]


def _catch_up(tokens: list[int]) -> SessionChunk:
    # Committed but never delivered: no verify step of this router's stats produced them.
    return SessionChunk(tokens=tuple(tokens))
