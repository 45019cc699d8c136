"""OpenAI-compatible request bodies for `/v1/completions` and `/v1/chat/completions`, and the error body.

Types are strict (JSON `true` or `"4"` is no integer, `"yes"` no boolean): a client that sends the
wrong type should hear so rather than get a guess. Every field OpenAI clients send is known: the
ones this server implements take their values, the others (tools, JSON modes, logit bias, audio...)
are accepted at their neutral values only (null, false, empty, `{"type": "text"}`) and refused
otherwise with a 400 naming the field, so frameworks that always send them work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from specray.router.errors import RequestError
from specray.workers.engine.sampling import MAX_LOGPROBS, MAX_REPETITION_PENALTY

MAX_N = 16


def _neutral(*allowed: Any, why: str) -> Any:
    """A field this server does not implement: only the `allowed` values (which change nothing)."""

    def check(value: Any) -> Any:
        # `type(...) is` keeps JSON's true apart from 1 and false from 0.
        if not any(value == a and type(value) is type(a) for a in allowed):
            choices = " or ".join(json.dumps(a) for a in allowed)
            raise ValueError(f"{why}; only {choices} is accepted")
        return value

    return Annotated[Any, AfterValidator(check)]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


class _Strict(BaseModel):
    # An unknown field is refused (400 naming it), as OpenAI does, rather than silently ignored.
    # Python's JSON parser reads NaN and Infinity; no field takes them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: _neutral(None, False, why="stream obfuscation is not implemented") = None


class ResponseFormat(_Strict):
    type: Literal["text"]

    @field_validator("type", mode="before")
    @classmethod
    def _only_text(cls, value: Any) -> Any:
        if value in ("json_object", "json_schema"):
            raise ValueError(f"{value} output is not supported (no constrained decoding); use text")
        return value


class _Request(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 and 0 mean no cut
    seed: int | None = Field(None, ge=0)
    stop: list[str] | None = None  # a string arrives as a list of one
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)  # vLLM's extension
    session_id: str | None = Field(None, min_length=1, max_length=128)
    # End-user ids and cache hints: they change no output, so they are taken and not used.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    logit_bias: _neutral(None, {}, why="logit_bias is not supported") = None
    min_p: _neutral(None, 0, 0.0, why="min_p is not supported") = None

    def check(self) -> None:
        """Rules between fields (RequestError naming the field), after each field is valid."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, list):
            return value
        if isinstance(value, str):
            return [value]
        raise ValueError("stop must be a string or a list of strings")

    def stop_list(self) -> list[str]:
        return list(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    # Text, a list of texts, token ids, or a list of token-id lists; each prompt gets n choices.
    prompt: Any
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: _neutral(None, "", why="suffix (insertion) is not supported") = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if isinstance(value, str) or (_is_token_ids(value) and value):
            return [value]
        if isinstance(value, list) and value and all(isinstance(p, str) or _is_token_ids(p) for p in value):
            return value
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
        )

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestError("only best_of equal to n is supported (every choice is returned)", "best_of")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[TextPart]  # a string arrives as one text part
    name: str | None = None
    # An assistant turn as OpenAI clients echo it back; tool calls are not supported.
    tool_calls: _neutral(None, [], why="tool calls are not supported") = None
    function_call: _neutral(None, why="function calls are not supported") = None
    refusal: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, value: Any) -> Any:
        if value in ("tool", "function"):
            raise ValueError(f"{value} messages are not supported (no tool calling)")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(f"content[{i}] has type {kind}: this model reads text parts only")
        return value

    def text(self) -> str:
        """The content as one string; text parts are joined with newlines, as vLLM does."""
        return "\n".join(p.text for p in self.content)

    def template_dict(self) -> dict[str, str]:
        """The message as the chat template reads it."""
        message = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: _neutral(None, [], why="tools are not supported") = None
    tool_choice: _neutral(None, "none", why="tools are not supported") = None
    parallel_tool_calls: _neutral(None, True, False, why="tools are not supported") = None
    functions: _neutral(None, [], why="functions are not supported") = None
    function_call: _neutral(None, "none", why="functions are not supported") = None
    modalities: _neutral(None, ["text"], why="this model writes text only") = None
    audio: _neutral(None, why="audio output is not supported") = None
    prediction: _neutral(None, why="predicted outputs are not supported") = None
    reasoning_effort: _neutral(None, why="reasoning_effort is not supported") = None
    verbosity: _neutral(None, why="verbosity is not supported") = None
    web_search_options: _neutral(None, why="web search is not supported") = None
    store: _neutral(None, False, why="stored completions are not supported") = None
    metadata: _neutral(None, {}, why="metadata is only for stored completions, which are not supported") = (
        None
    )
    service_tier: _neutral(None, "auto", "default", why="there is one service tier") = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs set to true", "top_logprobs")


def error_body(
    message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# Every field name of the request bodies: an error's location keeps these (and list indices) and
# drops pydantic's own parts (union branch tags such as `list[str]`).
FIELDS = frozenset(
    name
    for model in (
        CompletionRequest,
        ChatCompletionRequest,
        ChatMessage,
        TextPart,
        StreamOptions,
        ResponseFormat,
    )
    for name in model.model_fields
)


def error_param(loc: tuple[str | int, ...], unknown_field: bool = False) -> str | None:
    """`stop[0]` for the location ('body', 'stop', 'list[str]', 0); `unknown_field`: the last part
    is a key the client sent that no model has."""
    parts = loc[1:] if loc and loc[0] == "body" else loc
    param = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            if param:  # a list index (a JSON syntax error's loc is a position, not an index)
                param += f"[{part}]"
        elif part in FIELDS or (unknown_field and i == len(parts) - 1):
            param += f".{part}" if param else part
        # Anything else is pydantic's name for a branch of a union: not part of the path.
    return param or None


def validation_error_body(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The 400 body of pydantic's errors: one message per field (each branch of a union reports
    its own), the first field as `param`."""
    by_param: dict[str | None, list[str]] = {}
    for error in errors:
        unknown = error["type"] == "extra_forbidden"
        messages = by_param.setdefault(error_param(tuple(error["loc"]), unknown), [])
        if unknown:
            message = "unknown field (this server does not implement it)"
        elif error["type"] == "json_invalid":
            message = f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'cannot parse it')}"
        elif tuple(error["loc"]) == ("body",) and error["type"] == "model_attributes_type":
            message = "the body must be a JSON object"
        else:
            message = error["msg"].removeprefix("Value error, ")
        if message not in messages:
            messages.append(message)
    text = "; ".join(f"{p}: {' or '.join(m)}" if p else " or ".join(m) for p, m in by_param.items())
    return error_body(text or "invalid request", param=next(iter(by_param), None))
