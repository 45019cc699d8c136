"""OpenAI-shaped replies: whole chat and text completions, their SSE streams, and logprobs.

Chat streams open with one role delta per choice (`{"role": "assistant", "content": ""}`) and each
choice's last chunk carries its finish_reason. Usage as OpenAI streams it: with
`stream_options.include_usage` every chunk has `"usage": null` and one last chunk (no choices)
carries the request's usage; without it, each choice's last chunk carries that choice's usage.
`speculation` (verify steps, draft and accepted tokens, τ) rides along wherever usage does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from specray.router.errors import RequestError, Unavailable
from specray.router.generation import Delta, GenerationRequest
from specray.router.openai_schema import error_body
from specray.workers.engine.sampling import TokenLogprob

# JSON has no -inf (a token that top-k / top-p cut): reported as vLLM does.
MIN_LOGPROB = -9999.0


class TokenText:
    """Each token id's own text (its bytes may be part of a character: then U+FFFD, as in vLLM)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}  # at most the vocabulary

    def __call__(self, token: int) -> str:
        if token not in self._cache:
            self._cache[token] = self.tokenizer.decode([token])
        return self._cache[token]


def _value(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def chat_logprobs(logprobs: list[TokenLogprob], text_of: TokenText) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = text_of(token)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}

    content = [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: list[tuple[int, TokenLogprob | None]], text_of: TokenText, offset: int
) -> tuple[dict[str, Any], int]:
    """The legacy completions shape of (token, logprob) entries, and the text offset after them.
    A None logprob is the prompt's first token, which has none. Each top-logprobs dict also holds
    the chosen token, as vLLM's does."""
    tokens, values, tops, offsets = [], [], [], []
    for token, lp in entries:
        text = text_of(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_value(lp.logprob))
        top = {text_of(t): _value(v) for t, v in lp.top}
        top.setdefault(text, _value(lp.logprob))
        tops.append(top)
    body = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
    return body, offset


def _speculation(deltas: list[Delta]) -> dict[str, Any]:
    steps = sum(d.verify_steps for d in deltas)
    accepted = sum(d.accepted_tokens for d in deltas)
    return {
        "verify_steps": steps,
        "draft_tokens": sum(d.draft_tokens for d in deltas),
        "accepted_tokens": accepted,
        "tau": (accepted + steps) / steps if steps else 0.0,
    }


@dataclass
class Responder:
    """Builds one request's replies (whole or streamed) for the chat or the completions API."""

    requests: list[GenerationRequest]  # the request's choices, in index order
    model: str
    text_of: TokenText
    chat: bool
    n: int = 1  # choices per prompt: the choices of one prompt share its usage
    logprobs: bool = False  # whether choices carry logprobs
    echo: bool = False  # completions: the prompt before each choice's text
    include_usage: bool = False
    _offsets: dict[int, int] = field(default_factory=dict)  # completions: text offset per choice
    _started: set[int] = field(default_factory=set)  # choices whose first delta went out

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, obj: str) -> dict[str, Any]:
        first = self.requests[0]
        return {
            "id": first.request_id,
            "object": obj,
            "created": first.created,
            "model": self.model,
            # One session id when the request is one session (a conversation can go on with it).
            "session_id": first.session_id if len(self.requests) == 1 else None,
        }

    def _usage(self, deltas: dict[int, Delta]) -> dict[str, int]:
        """Usage of these choices: each prompt's tokens once, however many of its choices."""
        prompts = {r.index // self.n: len(r.prompt_ids) for r in self.requests if r.index in deltas}
        prompt = sum(prompts.values())
        completion = sum(d.completion_tokens for d in deltas.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, request: GenerationRequest, delta: Delta, first: bool) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(delta.logprobs, self.text_of)
        entries: list[tuple[int, TokenLogprob | None]] = [(lp.token, lp) for lp in delta.logprobs]
        if first and self.echo:
            prompt = [(request.prompt_ids[0], None)] + [(lp.token, lp) for lp in delta.prompt_logprobs or []]
            entries = prompt + entries
        body, self._offsets[request.index] = completion_logprobs(
            entries, self.text_of, self._offsets.get(request.index, 0)
        )
        return body

    def _choice(self, request: GenerationRequest, delta: Delta, first: bool, whole: bool) -> dict[str, Any]:
        logprobs = self._logprobs(request, delta, first)
        choice: dict[str, Any] = {"index": request.index}
        if self.chat:
            choice["message" if whole else "delta"] = (
                {"role": "assistant", "content": delta.text} if whole else {"content": delta.text}
            )
        else:
            choice["text"] = (request.prompt_text if first and self.echo else "") + delta.text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = delta.finish_reason
        return choice

    # ---- whole replies --------------------------------------------------------------------------
    def whole(self, deltas: list[Delta]) -> dict[str, Any]:
        body = self._envelope(self._object)
        body["choices"] = [self._choice(r, d, True, True) for r, d in zip(self.requests, deltas)]
        body["usage"] = self._usage({r.index: d for r, d in zip(self.requests, deltas)})
        body["speculation"] = _speculation(deltas)
        return body

    # ---- streams --------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = choices
        if self.include_usage:
            body["usage"] = None
        return body

    async def events(
        self, first: tuple[int, Delta], deltas: AsyncGenerator[tuple[int, Delta], None]
    ) -> AsyncIterator[str]:
        """The SSE events of a stream whose first delta is `first` (already taken, so that placement
        errors became an HTTP status before the 200 went out)."""
        by_index = {r.index: r for r in self.requests}
        finished: dict[int, Delta] = {}
        try:
            if self.chat:
                for request in self.requests:
                    role = {"index": request.index, "delta": {"role": "assistant", "content": ""}}
                    yield _sse(self._chunk([{**role, "logprobs": None, "finish_reason": None}]))
            item: tuple[int, Delta] | None = first
            while item is not None:
                index, delta = item
                request = by_index[index]
                chunk = self._chunk([self._choice(request, delta, index not in self._started, False)])
                self._started.add(index)
                if delta.finish_reason:
                    finished[index] = delta
                    if not self.include_usage:
                        chunk["usage"] = self._usage({index: delta})
                        chunk["speculation"] = _speculation([delta])
                yield _sse(chunk)
                item = await anext(deltas, None)
            if self.include_usage:
                chunk = self._chunk([])
                chunk["usage"] = self._usage(finished)
                chunk["speculation"] = _speculation(list(finished.values()))
                yield _sse(chunk)
        except RequestError as err:
            yield _sse(error_body(str(err), param=err.param))
        except Unavailable as err:
            yield _sse(error_body(str(err), "server_error", "service_unavailable"))
        except Exception as err:  # a fault mid-stream: the client hears of it before [DONE]
            yield _sse(error_body(f"internal error: {err!r}", "server_error", "internal_error"))
        finally:
            await deltas.aclose()
        yield "data: [DONE]\n\n"


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
