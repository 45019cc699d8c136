"""What a request can fail with, whatever the API: each maps to one HTTP status and one gRPC code."""

from __future__ import annotations


class RequestError(ValueError):
    """The client's fault: HTTP 400 / gRPC INVALID_ARGUMENT. `param` names the field at fault (the
    OpenAI error body's `param`); None only for a problem with the body as a whole."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(LookupError):
    """The request names a model this server does not serve: HTTP 404 `model_not_found` / gRPC
    NOT_FOUND."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model


class Unavailable(RuntimeError):
    """No capacity right now: HTTP 503 / gRPC UNAVAILABLE."""


class Overloaded(RuntimeError):
    """Too many requests in flight on this router: HTTP 429 / gRPC RESOURCE_EXHAUSTED, with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
