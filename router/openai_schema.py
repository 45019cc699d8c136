"""OpenAI-compatible request and response bodies for `/v1/completions` and `/v1/chat/completions`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specray.router.generation import Delta, GenerationRequest

# (request, delta, model name, whether this is a whole non-streamed reply) -> JSON body
ChunkBuilder = Callable[[GenerationRequest, Delta, str, bool], dict[str, Any]]


class _Request(BaseModel):
    # An unknown field is refused (400 naming it), as OpenAI does, rather than silently ignored: a
    # client that asks for something this server does not do should hear so. Python's JSON parser
    # reads NaN and Infinity; no field takes them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    session_id: str | None = Field(None, min_length=1, max_length=128)
    # Sent by common OpenAI clients; accepted at their neutral values only.
    user: str | None = None
    stream_options: dict[str, bool] | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Request):
    prompt: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _usage(request: GenerationRequest, delta: Delta) -> dict[str, int]:
    prompt = len(request.prompt_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": delta.completion_tokens,
        "total_tokens": prompt + delta.completion_tokens,
    }


def _speculation(delta: Delta) -> dict[str, Any]:
    return {
        "verify_steps": delta.verify_steps,
        "draft_tokens": delta.draft_tokens,
        "accepted_tokens": delta.accepted_tokens,
        "tau": delta.tau,
    }


def completion_chunk(request: GenerationRequest, delta: Delta, model: str, final: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request.request_id,
        "object": "text_completion",
        "created": request.created,
        "model": model,
        "session_id": request.session_id,
        "choices": [{"index": 0, "text": delta.text, "finish_reason": delta.finish_reason, "logprobs": None}],
    }
    if delta.finish_reason:
        body["usage"] = _usage(request, delta)
        body["speculation"] = _speculation(delta)
    return body


def chat_chunk(request: GenerationRequest, delta: Delta, model: str, final: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request.request_id,
        "object": "chat.completion" if final else "chat.completion.chunk",
        "created": request.created,
        "model": model,
        "session_id": request.session_id,
    }
    if final:
        message = {"role": "assistant", "content": delta.text}
        body["choices"] = [{"index": 0, "message": message, "finish_reason": delta.finish_reason}]
    else:
        body["choices"] = [
            {"index": 0, "delta": {"content": delta.text}, "finish_reason": delta.finish_reason}
        ]
    if delta.finish_reason:
        body["usage"] = _usage(request, delta)
        body["speculation"] = _speculation(delta)
    return body
