"""What the router does for one request, whatever the API: tokenize, place, stream, detokenize.

Placement: a session id already in Redis goes back to the verifier that holds its KV (affinity);
anything else goes to the live verifier with the fewest sessions in flight from this router. The
draft worker is picked by the Serve handle (least loaded of two random replicas).
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial

from opentelemetry.trace import SpanKind
from ray.serve.handle import DeploymentHandle
from redis.exceptions import RedisError
from transformers import PreTrainedTokenizerBase

from specray.cluster.runtime import tracing
from specray.cluster.runtime.failover_config import Failover
from specray.cluster.runtime.limits import RequestLimits
from specray.cluster.runtime.session_store import SessionStore, VerifierInfo
from specray.router.admission import Admission
from specray.router.errors import Overloaded, RequestError, Unavailable
from specray.router.failover import resumable_chunks
from specray.router.metrics import RouterMetrics
from specray.router.request_checks import check_request
from specray.workers.draft_worker.messages import SessionChunk, SessionRequest
from specray.workers.engine.request_limits import check_context
from specray.workers.engine.sampling import SamplingParams

__all__ = ["Delta", "Generation", "GenerationRequest", "Overloaded", "RequestError", "Unavailable"]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    session_id: str
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    # Filled on the last delta.
    completion_tokens: int = 0
    verify_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def tau(self) -> float:
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0


class Generation:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_context: int,
        default_max_tokens: int,
        store: SessionStore,
        draft_workers: DeploymentHandle,
        metrics: RouterMetrics,
        limits: RequestLimits | None = None,
        failover: Failover | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens
        self.store = store
        self.draft_workers = draft_workers
        self.metrics = metrics
        self.admission = Admission(limits or RequestLimits())
        self.failover = failover or Failover()
        self._in_flight: Counter[str] = Counter()  # this router's open sessions per verifier

    # ---- request building -----------------------------------------------------------------------
    def build(
        self,
        *,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        seed: int | None,
        stop: list[str],
        session_id: str | None,
    ) -> GenerationRequest:
        if (prompt is None) == (messages is None):
            raise RequestError("give exactly one of prompt or messages")
        try:
            check_request(
                prompt=prompt, messages=messages, stop=stop, seed=seed, top_k=top_k, session_id=session_id
            )
            params = SamplingParams(
                max_tokens=max_tokens or self.default_max_tokens,
                temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                top_k=top_k or 0,
                seed=seed,
                stop=tuple(stop),
            )
        except ValueError as err:
            raise RequestError(str(err)) from err
        if messages is not None:
            prompt_ids = list(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        else:
            prompt_ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        try:
            check_context(len(prompt_ids), params.max_tokens, self.max_context)
        except ValueError as err:
            raise RequestError(str(err)) from err
        return GenerationRequest(prompt_ids, params, session_id or f"sess-{uuid.uuid4().hex}")

    # ---- placement ------------------------------------------------------------------------------
    async def _pick_verifier(
        self, session_id: str, avoid: set[str] = frozenset(), resuming: bool = False
    ) -> VerifierInfo:
        """`avoid`: verifiers that failed this request; `resuming`: its own record says running."""
        try:
            verifiers = [v for v in await self.store.live_verifiers() if v.verifier_id not in avoid]
            record = await self.store.get_session(session_id)
        except RedisError as err:
            raise Unavailable(f"the session store is unreachable: {err}") from err
        if not verifiers:
            raise Unavailable("no verifier is registered yet")
        if record is not None:
            if record.get("status") == "running" and not resuming:
                raise RequestError(f"session {session_id} already has a request in flight")
            owner = next((v for v in verifiers if v.verifier_id == record.get("verifier")), None)
            if owner is not None:
                return owner
        return min(
            verifiers, key=lambda v: (self._in_flight[v.verifier_id], v.active_sessions, random.random())
        )

    # ---- streaming ------------------------------------------------------------------------------
    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Text deltas as the verifier commits tokens; the last one carries finish_reason and stats.

        Overloaded when this router already generates its limit of requests.
        """
        with self.admission.slot():
            async with aclosing(self._stream(request)) as deltas:
                async for delta in deltas:
                    yield delta

    async def _path(
        self,
        request: GenerationRequest,
        trace_context: dict[str, str],
        verifier: VerifierInfo,
        output_ids: list[int],
    ) -> AsyncIterator[SessionChunk]:
        """One attempt: the draft worker's chunks for `request` on `verifier`, after `output_ids`."""
        self._in_flight[verifier.verifier_id] += 1
        chunks = self.draft_workers.options(stream=True).generate.remote(
            SessionRequest(
                session_id=request.session_id,
                verifier_address=verifier.address,
                prompt_ids=tuple(request.prompt_ids),
                params=request.params,
                max_context=self.max_context,
                output_ids=tuple(output_ids),
                # The W3C traceparent: the draft worker's spans join this request's trace.
                trace_context=trace_context,
            )
        )
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._in_flight[verifier.verifier_id] -= 1
            chunks.cancel()

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        attributes = {tracing.SESSION_ID: request.session_id, "specray.request_id": request.request_id}
        with (
            self.metrics.request(len(request.prompt_ids)) as tracked,
            tracing.span_scope("specray.request", None, attributes, SpanKind.SERVER) as span,
        ):
            # Placement and the draft worker's stream, resumed elsewhere when a replica dies.
            chunks = resumable_chunks(
                request.session_id,
                request.prompt_ids,
                partial(self._pick_verifier, request.session_id),
                partial(self._path, request, tracing.inject(tracing.child_of(span))),
                self.store,
                self.failover,
            )
            output_ids: list[int] = []
            sent = 0
            steps = drafts = accepted = 0
            # While stop strings may still match, the last characters are held back (they may be cut).
            hold = max(map(len, request.params.stop), default=1) - 1
            async with aclosing(chunks):
                async for chunk in chunks:
                    output_ids += chunk.tokens
                    steps += 1
                    drafts += chunk.num_drafts
                    accepted += chunk.accepted
                    tracked.step(len(chunk.tokens), chunk.num_drafts, chunk.accepted)
                    text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
                    if chunk.finished:
                        tracked.finish(chunk.finish_reason)
                        span.set_attributes(
                            {
                                "specray.completion_tokens": len(output_ids),
                                "specray.verify_steps": steps,
                                "specray.draft_tokens": drafts,
                                tracing.ACCEPTED: accepted,
                            }
                        )
                        if chunk.stop_text_len is not None:
                            text = text[: chunk.stop_text_len]
                        yield Delta(
                            text[sent:],
                            list(chunk.tokens),
                            chunk.finish_reason,
                            len(output_ids),
                            steps,
                            drafts,
                            accepted,
                        )
                        return
                    # A trailing U+FFFD is a partial UTF-8 character the next token completes.
                    visible = len(text) - (1 if text.endswith("\ufffd") else 0) - hold
                    if visible > sent or chunk.tokens:
                        yield Delta(text[sent : max(visible, sent)], list(chunk.tokens))
                        sent = max(visible, sent)

    async def complete(self, request: GenerationRequest) -> Delta:
        """The whole completion as one delta."""
        text, tokens = [], []
        async for delta in self.stream(request):
            text.append(delta.text)
            tokens += delta.token_ids
        return Delta(
            "".join(text),
            tokens,
            delta.finish_reason,
            delta.completion_tokens,
            delta.verify_steps,
            delta.draft_tokens,
            delta.accepted_tokens,
        )
