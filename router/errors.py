"""What a request can fail with, whatever the API: each maps to one HTTP status and one gRPC code."""

from __future__ import annotations


class RequestError(ValueError):
    """The client's fault: HTTP 400 / gRPC INVALID_ARGUMENT."""


class Unavailable(RuntimeError):
    """No capacity right now: HTTP 503 / gRPC UNAVAILABLE."""


class Overloaded(RuntimeError):
    """Too many requests in flight on this router: HTTP 429 / gRPC RESOURCE_EXHAUSTED, with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
