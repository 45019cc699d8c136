"""The optional API key, on both client APIs: `Authorization: Bearer <key>` (HTTP header or gRPC
metadata). Without a configured key every request is let through."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable

import grpc

ENV_VAR = "SPECRAY_API_KEY"


def resolve_api_key(configured: str | None) -> str | None:
    """The key from the config ($VARS expanded), else $SPECRAY_API_KEY; None when neither is set."""
    key = os.path.expandvars(configured) if configured is not None else os.environ.get(ENV_VAR)
    return key or None


def authorized(api_key: str | None, authorization: str | None) -> bool:
    """Whether an `Authorization` value carries the key (constant-time compare)."""
    if api_key is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses gRPC calls without the key (UNAUTHENTICATED) before their request is even parsed."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(handler_call_details.invocation_metadata or ())
        handler = await continuation(handler_call_details)
        if handler is None or authorized(self.api_key, metadata.get("authorization")):
            return handler

        async def deny(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required")

        # The same shape of RPC as the real method, reading the request as raw bytes.
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
