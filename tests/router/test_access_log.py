"""The access log on its own: a Starlette app behind the middleware, driven as ASGI, its requests
tracked by the router's RouterMetrics, one line each on `specray.access`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from specray.router.access_log import AccessLog, GrpcAccessLog
from specray.router.errors import Unavailable
from specray.router.metrics import RouterMetrics

metrics = RouterMetrics("m", num_speculative_tokens=2)


async def complete(request):
    with metrics.request(num_prompt_tokens=3) as tracked:
        tracked.step(num_tokens=1, num_draft_tokens=0, accepted=0)  # prefill
        tracked.step(num_tokens=3, num_draft_tokens=2, accepted=2)
        tracked.finish("length")
    return JSONResponse({"ok": True})


async def stream_that_fails(request):
    async def events():
        with metrics.request(num_prompt_tokens=3) as tracked:
            tracked.step(num_tokens=1, num_draft_tokens=0, accepted=0)
            yield b"data: first\n\n"
            raise Unavailable("no verifier came back")

    return StreamingResponse(events(), media_type="text/event-stream")


async def health(request):
    return JSONResponse({"status": "ok"})


APP = AccessLog(
    Starlette(
        routes=[
            Route("/v1/completions", complete, methods=["POST"]),
            Route("/v1/chat/completions", stream_that_fails, methods=["POST"]),
            Route("/health", health),
        ]
    )
)


def _call(method: str, path: str) -> list[dict]:
    sent: list[dict] = []
    incoming = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict:
        return incoming.pop(0) if incoming else await asyncio.Event().wait()

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    scope |= {"http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "root_path": ""}
    # The failing stream's error goes on to Serve (which closes the connection) after the line.
    with pytest.raises(Unavailable) if "chat" in path else contextlib.nullcontext():
        asyncio.run(APP(scope, receive, send))
    return sent


def test_a_finished_request_logs_tokens_tau_and_latency(caplog):
    with caplog.at_level(logging.INFO, logger="specray.access"):
        _call("POST", "/v1/completions")
    [line] = [r.getMessage() for r in caplog.records if r.name == "specray.access"]
    # 4 tokens over 2 verify steps, 2 drafts accepted: τ = (2 + 2) / 2.
    assert line.startswith("POST /v1/completions 200 4 tokens τ 2.00 ") and line.endswith(" s")


def test_a_stream_that_fails_after_its_200_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="specray.access"):
        _call("POST", "/v1/chat/completions")
    [line] = [r.getMessage() for r in caplog.records if r.name == "specray.access"]
    assert line.startswith("POST /v1/chat/completions 200 1 tokens τ 1.00 ")
    assert line.endswith("(failed: unavailable)")


def test_probes_are_logged_at_debug_only(caplog):
    with caplog.at_level(logging.INFO, logger="specray.access"):
        _call("GET", "/health")
    assert not [r for r in caplog.records if r.name == "specray.access"]
    with caplog.at_level(logging.DEBUG, logger="specray.access"):
        _call("GET", "/health")
    assert [r.getMessage() for r in caplog.records][-1].startswith("GET /health 200 ")


async def _grpc_calls() -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with metrics.request(num_prompt_tokens=1) as tracked:
            tracked.step(num_tokens=2, num_draft_tokens=0, accepted=0)
            tracked.finish("stop")
        return b"ok"

    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        yield b"first"
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no verifier")

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
        # A streaming method's handler that is a plain coroutine, as the API-key interceptor's.
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required")

    server = grpc.aio.server(interceptors=[GrpcAccessLog()])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Refused": grpc.unary_stream_rpc_method_handler(refuse),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary("/t.T/Unary")(b"x") == b"ok"
            for method in ("/t.T/Stream", "/t.T/Refused"):
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in channel.unary_stream(method)(b"x"):
                        pass
    finally:
        await server.stop(None)


def test_grpc_calls_get_their_line_with_the_status_code(caplog):
    with caplog.at_level(logging.INFO, logger="specray.access"):
        asyncio.run(_grpc_calls())
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "specray.access")
    assert len(lines) == 3
    assert lines[0].startswith("gRPC /t.T/Refused UNAUTHENTICATED ")
    assert lines[1].startswith("gRPC /t.T/Stream UNAVAILABLE ")
    assert lines[2].startswith("gRPC /t.T/Unary OK 2 tokens τ 1.00 ")
