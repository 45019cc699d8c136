"""Prometheus metrics of the router, served on `/metrics`.

Names follow vLLM's where a counterpart exists (under the `specray:` prefix instead of `vllm:`) so
dashboards built for vLLM's speculative decoding read these unchanged. Acceptance numbers originate
in the verifiers but travel back with every verify result, so the router counts them itself and no
cross-replica metrics channel is needed. Each `RouterMetrics` owns a private registry: two routers
in one process (or a test) never share counts, and nothing leaks into Ray's own default registry.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specray.router import access_log
from specray.router.errors import RequestError, Unavailable

# vLLM's buckets, so histograms from both systems can be compared bucket by bucket.
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# A request that ended without a finish reason: the client went away (vLLM's finish reason
# `abort`), or it failed, by the error's kind.
ABORT = "abort"
FAILURE_REASONS = ("unavailable", "invalid", "error")


class RouterMetrics:
    def __init__(self, model_name: str, num_speculative_tokens: int) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.num_drafts = Counter(
            "specray:spec_decode_num_drafts",
            "Draft segments verified (verify steps that carried at least one draft token).",
            labels,
            registry=self.registry,
        )
        self.num_draft_tokens = Counter(
            "specray:spec_decode_num_draft_tokens",
            "Draft tokens the target verified (tails the confidence scheduler dropped are not counted).",
            labels,
            registry=self.registry,
        )
        self.num_accepted_tokens = Counter(
            "specray:spec_decode_num_accepted_tokens",
            "Draft tokens the verifier accepted.",
            labels,
            registry=self.registry,
        )
        self.num_accepted_tokens_per_pos = Counter(
            "specray:spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by their position in the segment (0 is the first draft token).",
            [*labels, "position"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "specray:time_to_first_token_seconds",
            "From the router receiving the request to the first output token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "specray:inter_token_latency_seconds",
            "Between consecutive verify steps of a request (one observation per step, as vLLM does"
            " per engine step, whatever the number of tokens the step committed).",
            labels,
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.num_requests_running = Gauge(
            "specray:num_requests_running",
            "Requests producing tokens.",
            labels,
            registry=self.registry,
        )
        self.num_requests_waiting = Gauge(
            "specray:num_requests_waiting",
            "Requests admitted that have no output token yet (placement, draft worker queue, prefill).",
            labels,
            registry=self.registry,
        )
        self.request_success = Counter(
            "specray:request_success",
            "Requests that finished, by finish reason (`abort`: the client went away first).",
            [*labels, "finish_reason"],
            registry=self.registry,
        )
        self.request_failure = Counter(
            "specray:request_failure",
            "Requests that failed once admitted, by reason: unavailable (no verifier, the session store"
            " unreachable, no path back within failover.deadline_s), invalid (refused by the verifier),"
            " error (anything else).",
            [*labels, "reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "specray:prompt_tokens",
            "Prompt tokens of the requests admitted.",
            labels,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "specray:generation_tokens",
            "Output tokens the requests received (committed by the verifiers).",
            labels,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            "specray:e2e_request_latency_seconds",
            "From the router receiving the request to its end, for requests that finished or were aborted.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        # Series exist (at 0) from the start, as in vLLM, so rates work before the first request.
        for collector in (
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            self.time_to_first_token,
            self.inter_token_latency,
            self.num_requests_running,
            self.num_requests_waiting,
            self.prompt_tokens,
            self.generation_tokens,
            self.e2e_request_latency,
        ):
            collector.labels(model_name)
        for reason in FAILURE_REASONS:
            self.request_failure.labels(model_name, reason)
        for position in range(num_speculative_tokens):
            self.num_accepted_tokens_per_pos.labels(model_name, str(position))

    def request(self, num_prompt_tokens: int) -> RequestMetrics:
        """A tracker for one request; use it as a context manager around the whole request."""
        return RequestMetrics(self, num_prompt_tokens)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class RequestMetrics:
    """One request's contribution: waiting until its first token, then running until it ends.

    It also fills in the request's access-log outcome (tokens, τ, how it ended) when the request
    came through the HTTP access log.
    """

    def __init__(self, metrics: RouterMetrics, num_prompt_tokens: int) -> None:
        self._metrics = metrics
        self._model = metrics.model_name
        self._num_prompt_tokens = num_prompt_tokens
        self._started = time.monotonic()
        self._last_step: float | None = None
        self._finished = False
        self._outcome = access_log.current_outcome()

    def __enter__(self) -> RequestMetrics:
        self._metrics.num_requests_waiting.labels(self._model).inc()
        self._metrics.prompt_tokens.labels(self._model).inc(self._num_prompt_tokens)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Whichever way the request ended (finished, failed, client gone), it leaves its gauge.
        gauge = (
            self._metrics.num_requests_waiting
            if self._last_step is None
            else self._metrics.num_requests_running
        )
        gauge.labels(self._model).dec()
        if self._finished:
            return
        if exc_type is None or issubclass(exc_type, (GeneratorExit, asyncio.CancelledError)):
            # Closed before its last token: the client went away (or stopped reading).
            self._end(ABORT)
            self._metrics.request_success.labels(self._model, ABORT).inc()
        else:
            reason = (
                "unavailable"
                if issubclass(exc_type, Unavailable)
                else "invalid"
                if issubclass(exc_type, RequestError)
                else "error"
            )
            self._metrics.request_failure.labels(self._model, reason).inc()
            if self._outcome is not None:
                self._outcome.ended = f"failed: {reason}"

    def _end(self, how: str) -> None:
        self._finished = True
        self._metrics.e2e_request_latency.labels(self._model).observe(time.monotonic() - self._started)
        if self._outcome is not None:
            self._outcome.ended = how

    def step(self, num_tokens: int, num_draft_tokens: int, accepted: int) -> None:
        """One verify result: `num_tokens` committed from a segment of `num_draft_tokens` drafts."""
        m, model = self._metrics, self._model
        now = time.monotonic()
        m.generation_tokens.labels(model).inc(num_tokens)
        if self._outcome is not None:
            self._outcome.record(num_tokens, num_draft_tokens, accepted)
        if num_tokens:
            if self._last_step is None:
                m.time_to_first_token.labels(model).observe(now - self._started)
                m.num_requests_waiting.labels(model).dec()
                m.num_requests_running.labels(model).inc()
            else:
                m.inter_token_latency.labels(model).observe(now - self._last_step)
            self._last_step = now
        if num_draft_tokens:
            m.num_drafts.labels(model).inc()
            m.num_draft_tokens.labels(model).inc(num_draft_tokens)
            m.num_accepted_tokens.labels(model).inc(accepted)
            # The verifier accepts a prefix: `accepted` drafts means positions 0 … accepted-1.
            for position in range(accepted):
                m.num_accepted_tokens_per_pos.labels(model, str(position)).inc()

    def finish(self, finish_reason: str) -> None:
        self._end(finish_reason)
        self._metrics.request_success.labels(self._model, finish_reason).inc()
