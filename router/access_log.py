"""One line per request on the `specray.access` logger: method, path, status, tokens, τ, latency.

The ASGI middleware (HTTP) and the gRPC interceptor open an `Outcome` for each request and log it
when the response is done (for a stream: after its last event). The request's tracker
(`router/metrics.py`) fills in the tokens, verify steps and how the generation ended, so a stream
that failed after its 200 says so. Probes and scrapes (`/health`, `/metrics`) are logged at DEBUG
only: they would drown the console. gRPC lines read `gRPC /specray.v1.Generation/Generate OK ...`.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
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


def format_line(method: str, path: str, status: int | str | None, outcome: Outcome, latency_s: float) -> str:
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


class GrpcAccessLog(grpc.aio.ServerInterceptor):
    """The same line for each gRPC call, with its status code; the outermost interceptor, so calls
    refused by the others (no API key) get theirs too."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:  # the API's methods take one request
            return handler
        method = handler_call_details.method
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.response_streaming:
            stream = handler.unary_stream

            async def logged_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with _GrpcCall(method, context):
                    replies = stream(request, context)
                    if inspect.isawaitable(replies):  # a handler that only aborts or writes itself
                        await replies
                        return
                    async for reply in replies:
                        yield reply

            return grpc.unary_stream_rpc_method_handler(logged_stream, **serializers)
        unary = handler.unary_unary

        async def logged_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _GrpcCall(method, context):
                return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(logged_unary, **serializers)


class _GrpcCall:
    """One gRPC call's Outcome, logged with the call's status code when it ends."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method, self.context = method, context

    def __enter__(self) -> None:
        self.outcome = Outcome()
        self.token = _current.set(self.outcome)
        self.started = time.perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        _current.reset(self.token)
        code = self.context.code()  # set by an abort; None when the handler returned normally
        if code is None:
            code = grpc.StatusCode.OK if exc_type is None else grpc.StatusCode.UNKNOWN
        if logger.isEnabledFor(logging.INFO):
            line = format_line(
                "gRPC", self.method, code.name, self.outcome, time.perf_counter() - self.started
            )
            logger.info(line)
