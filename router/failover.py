"""Failover: a request whose verifier or draft worker dies goes on elsewhere, losing no token.

The verifier writes each step's committed tokens to Redis behind its replies, so Redis may lag
what the router received by the writes in flight, or lead it by replies lost with a dead draft
worker. When the path fails — the draft worker reports its verifier unreachable, or the draft
worker itself dies (a Ray error on its stream) — the router waits a moment, takes from Redis any
committed tokens beyond those it received (while the record is still this request's, running,
and agrees with what it received), and opens the session again: on a live verifier other than a
failed one, through whichever draft worker Serve picks, with the committed output after the
prompt. With one replica per pool (the default) that is the replacement Serve starts, so the router
keeps trying, with backoff, until `failover.deadline_s` has passed without progress. The new
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
from specray.cluster.runtime.session_store import VERIFIER_TTL_S, SessionStore, VerifierInfo
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
    """The draft worker's chunks for one request. After a failure it resumes, waiting with backoff
    (a replacement replica must start first on a deployment of one), until a path delivers again
    or `policy.deadline_s` has passed since the failure; then it raises Unavailable.

    `catch_up=False` resumes from the tokens received rather than from Redis: tokens committed but
    never delivered come without their logprobs (Redis keeps none), so a request that asked for
    logprobs has them generated again; they were never sent, so the output stays a valid sample.
    """
    loop = asyncio.get_running_loop()
    received: list[int] = []
    # Verifiers that failed this request, until when they are not placed on: by then a dead one's
    # registration has expired, so one still registered is alive (the failure was transient).
    avoid: dict[str, float] = {}
    lost: Exception | None = None  # why the last path failed; None while the request progresses
    deadline = wait = 0.0
    while True:
        if lost is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(
                    f"generation could not resume within {policy.deadline_s:g} s: {_first_line(lost)}"
                )
            await asyncio.sleep(min(wait, remaining))
            wait = min(2 * wait, policy.max_backoff_s)
        if lost is not None and catch_up:
            ahead = await _ahead_in_store(store, session_id, prompt_ids, received)
            if ahead:
                received += ahead
                yield _catch_up(ahead)
        resuming = lost is not None
        try:
            verifier = await place({v for v, until in avoid.items() if until > loop.time()}, resuming)
            async with aclosing(open_path(verifier, received)) as chunks:
                opened = False
                while True:
                    # A resumed path's first chunk may wait for a replacement draft worker (Serve
                    # holds the call until one is up): no longer than the deadline.
                    timeout = max(deadline - loop.time(), 0.0) if resuming and not opened else None
                    chunk = await asyncio.wait_for(anext(chunks, None), timeout)
                    if chunk is None:
                        raise _PathLost("the draft worker's stream ended before the last token", None)
                    if chunk.failed:
                        # A resumed open may race the old stream's cleanup ("already open"): retry.
                        if chunk.code in CLIENT_ERRORS and (opened or not resuming):
                            raise RequestError(chunk.error)
                        failed = verifier.verifier_id if chunk.code == "UNAVAILABLE" else None
                        raise _PathLost(chunk.error, failed)
                    if lost is not None:
                        logger.warning(
                            "session %s resumed on %s after %.1f s",
                            session_id,
                            verifier.verifier_id,
                            loop.time() - (deadline - policy.deadline_s),
                        )
                    opened = True
                    lost = None  # progress: a later failure gets a whole deadline again
                    received += chunk.tokens
                    yield chunk
                    if chunk.finished:
                        return
        except Unavailable as err:  # placement: e.g. the only verifier died, no replacement yet
            if not resuming:
                raise
            failure: Exception = err
        except RayError as err:  # the draft worker died or was removed mid-request
            failure = err
        except TimeoutError:
            failure = _PathLost("no draft worker took the resumed session in time", None)
        except _PathLost as err:
            failure = err
            if err.failed_verifier is not None:
                avoid[err.failed_verifier] = loop.time() + VERIFIER_TTL_S + 1
        if lost is None:
            deadline, wait = loop.time() + policy.deadline_s, policy.backoff_s
            logger.warning(
                "session %s lost its path after %d tokens (%s); resuming, for up to %g s",
                session_id,
                len(received),
                _first_line(failure),
                policy.deadline_s,
            )
        else:
            logger.debug("session %s: no path yet: %s", session_id, _first_line(failure))
        lost = failure


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


def _first_line(err: BaseException) -> str:
    # Ray's and gRPC's errors span many lines (the dead actor's details, the RPC's debug string).
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _catch_up(tokens: list[int]) -> SessionChunk:
    # Committed but never delivered: no verify step of this router's stats produced them.
    return SessionChunk(tokens=tuple(tokens))
