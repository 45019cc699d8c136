"""One line per HTTP request on the `specray.access` logger: method, path, status, tokens, τ, latency.

The ASGI middleware opens an `Outcome` for each request and logs it when the response is done (for
a stream: after its last event). The request's tracker (`router/metrics.py`) fills in the tokens,
verify steps and how the generation ended, so a stream that failed after its 200 says so. Probes
and scrapes (`/health`, `/metrics`) are logged at DEBUG only: they would drown the console.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("specray.access")
QUIET_PATHS = frozenset({"/health", "/metrics"})


@dataclass
class Outcome:
    """What one request produced, for its access-log line."""

    tokens: int = 0
    verify_steps: int = 0
    accepted: int = 0
    ended: str | None = None  # a finish reason, `abort`, or `failed: <reason>`

    def record(self, num_tokens: int, num_draft_tokens: int, accepted: int) -> None:
        self.tokens += num_tokens
        self.verify_steps += 1
        self.accepted += accepted

    @property
    def tau(self) -> float | None:
        """Tokens per verify step, the bonus token included (None before the first step)."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else None


# The tasks that serve one request (the endpoint, the stream's body) copy the context and so share
# its Outcome object.
_current: ContextVar[Outcome | None] = ContextVar("specray_access_outcome", default=None)


def current_outcome() -> Outcome | None:
    """The Outcome of the HTTP request being served, or None outside one (gRPC, tests)."""
    return _current.get()


def format_line(method: str, path: str, status: int | None, outcome: Outcome, latency_s: float) -> str:
    parts = [method, path, str(status) if status is not None else "-"]
    if outcome.verify_steps:
        parts += [f"{outcome.tokens} tokens", f"τ {outcome.tau:.2f}"]
    parts.append(f"{latency_s:.3f} s")
    if outcome.ended is not None and outcome.ended.startswith(("failed", "abort")):
        parts.append(f"({outcome.ended})")
    return " ".join(parts)


class AccessLog:
    """ASGI middleware writing each HTTP request's line once its response is complete."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outcome = Outcome()
        token = _current.set(outcome)
        started = time.perf_counter()
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            status = status or 500  # Starlette's outer error handler answers 500 for it
            raise
        finally:
            _current.reset(token)
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            if logger.isEnabledFor(level):
                line = format_line(
                    scope["method"], scope["path"], status, outcome, time.perf_counter() - started
                )
                logger.log(level, line)
