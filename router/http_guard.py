"""The HTTP front door: what is refused before FastAPI parses a request.

- `/v1/*` without the API key (when one is set): 401 with an OpenAI error body.
- A body over `limits.max_body_bytes`: 413, by its Content-Length or, for a chunked body, as soon as
  the bytes read pass the limit.
- A POST to `/v1/*` whose Content-Type is not JSON (curl's `-d` sends a form): 415 saying so, as
  vLLM answers, instead of a validation error about a "dictionary". No Content-Type is read as JSON.

Serve runs a frozen copy of the FastAPI app, so the Router replica cannot hand the middleware its
settings through the app: it sets them on this class (one Router replica per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specray.router.auth import authorized
from specray.router.openai_schema import error_body


@dataclass(frozen=True)
class GuardSettings:
    api_key: str | None
    max_body_bytes: int


class HttpGuard:
    settings: ClassVar[GuardSettings | None] = None

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @classmethod
    def configure(cls, settings: GuardSettings) -> None:
        cls.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.settings
        if scope["type"] != "http" or settings is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"].startswith("/v1/") and not authorized(
            settings.api_key, headers.get("authorization")
        ):
            response = JSONResponse(
                error_body(
                    "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key"
                ),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        too_large = f"the request body exceeds {settings.max_body_bytes} bytes"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            response = JSONResponse(error_body(too_large, code="body_too_large"), status_code=413)
            await response(scope, receive, send)
            return
        media_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if (
            scope["method"] == "POST"
            and scope["path"].startswith("/v1/")
            and media_type != "application/json"
        ):
            response = JSONResponse(
                error_body(
                    f"the request body must be JSON sent with Content-Type: application/json, not {media_type!r}",
                    code="unsupported_media_type",
                ),
                status_code=415,
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > settings.max_body_bytes:
                # FastAPI passes an HTTPException from body reading through to the error handlers.
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, bounded_receive, send)
