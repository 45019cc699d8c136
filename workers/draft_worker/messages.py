"""What crosses the Ray handle between the router and a draft worker.

`DraftWorker.generate` takes one `SessionRequest` and streams `SessionChunk`s: one per verify step
(the prefill first), or a single error chunk when the path fails. Both are frozen, check their own
fields when built, and pickle (Ray serializes them between processes).

Only the engine's types and the standard library are imported here, so the router can import this
module without pulling in the draft worker's gRPC and Serve dependencies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from specray.workers.engine.sampling import SamplingParams, TokenLogprob


def _token_ids(name: str, ids: Iterable[int]) -> tuple[int, ...]:
    ids = tuple(ids)
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"{name} must be non-negative token ids")
    return ids


def _count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class SessionRequest:
    """One session a router asks a draft worker to run against a verifier."""

    session_id: str
    verifier_address: str  # the verifier's gRPC address (host:port)
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_context: int  # the target's context length
    # The committed output after the prompt when the session resumes after a failure.
    output_ids: tuple[int, ...] = ()
    # The W3C trace headers (traceparent, ...): the draft worker's spans join the request's trace.
    trace_context: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", _token_ids("prompt_ids", self.prompt_ids))
        object.__setattr__(self, "output_ids", _token_ids("output_ids", self.output_ids))
        carrier = self.trace_context
        pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
        object.__setattr__(self, "trace_context", tuple((str(k), str(v)) for k, v in pairs))
        if not isinstance(self.session_id, str) or not self.session_id:
            raise ValueError("session_id must be a non-empty string")
        if not isinstance(self.verifier_address, str) or not self.verifier_address:
            raise ValueError("verifier_address must be a non-empty string")
        if not self.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if not isinstance(self.params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(self.params).__name__}")
        if (
            isinstance(self.max_context, bool)
            or not isinstance(self.max_context, int)
            or self.max_context < 1
        ):
            raise ValueError(f"max_context must be a positive integer, got {self.max_context!r}")
        if len(self.prompt_ids) + len(self.output_ids) > self.max_context:
            raise ValueError(
                f"prompt ({len(self.prompt_ids)} tokens) + output ({len(self.output_ids)} tokens) exceeds "
                f"the context of {self.max_context} tokens"
            )


@dataclass(frozen=True)
class SessionChunk:
    """One verify step's result for the router, or (with `error` and `code`) why the path failed."""

    tokens: tuple[int, ...] = ()  # committed this step: accepted drafts, then the target's token
    num_drafts: int = 0  # drafts the verifier checked this step
    accepted: int = 0
    finished: bool = False
    finish_reason: str | None = None  # set exactly when finished
    stop_text_len: int | None = None  # where a stop string cuts the output text (finished only)
    error: str | None = None
    code: str | None = None  # the verifier's error code name, or UNAVAILABLE
    # When the request asked: the target's logprob of each token of `tokens`, and (on the prefill's
    # chunk) of each prompt token after the first.
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", _token_ids("tokens", self.tokens))
        object.__setattr__(self, "logprobs", tuple(self.logprobs))
        object.__setattr__(self, "prompt_logprobs", tuple(self.prompt_logprobs))
        if self.logprobs and [lp.token for lp in self.logprobs] != list(self.tokens):
            raise ValueError("logprobs must give one entry per token, in order")
        _count("num_drafts", self.num_drafts)
        _count("accepted", self.accepted)
        if self.accepted > self.num_drafts:
            raise ValueError(f"accepted ({self.accepted}) exceeds num_drafts ({self.num_drafts})")
        if self.finished != (self.finish_reason is not None):
            raise ValueError("finish_reason is set exactly when the chunk is finished")
        if self.finish_reason is not None and not self.finish_reason:
            raise ValueError("finish_reason must not be empty")
        if self.stop_text_len is not None:
            _count("stop_text_len", self.stop_text_len)
            if not self.finished:
                raise ValueError("stop_text_len is only set on the finished chunk")
        if (self.error is None) != (self.code is None):
            raise ValueError("error and code go together")
        if self.error is not None:
            if not self.error or not self.code:
                raise ValueError("an error chunk needs a message and a code")
            if self.tokens or self.num_drafts or self.finished or self.prompt_logprobs:
                raise ValueError("an error chunk carries no tokens and does not finish")

    @classmethod
    def failure(cls, error: str, code: str) -> SessionChunk:
        """The chunk that ends a stream whose path failed."""
        return cls(error=error, code=code)

    @property
    def failed(self) -> bool:
        return self.error is not None
