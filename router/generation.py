"""What the router does for one request, whatever the API: tokenize, place, stream, detokenize.

Placement: a session id already in Redis goes back to the verifier that holds its KV (affinity);
anything else goes to the live verifier with the fewest sessions in flight from this router. The
draft worker is picked by the Serve handle (least loaded of two random replicas).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
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
from specray.router.errors import ModelNotFound, Overloaded, RequestError, Unavailable
from specray.router.failover import resumable_chunks
from specray.router.metrics import RouterMetrics
from specray.router.request_checks import MAX_SEED, check_request
from specray.workers.draft_worker.messages import SessionChunk, SessionRequest
from specray.workers.engine.request_limits import check_context
from specray.workers.engine.sampling import ParamError, SamplingParams, TokenLogprob

__all__ = [
    "Delta",
    "Generation",
    "GenerationRequest",
    "ModelNotFound",
    "Overloaded",
    "RequestError",
    "Unavailable",
]

# A prompt as the APIs take it: text, or token ids.
Prompt = str | Sequence[int]


@dataclass
class GenerationRequest:
    """One choice of a request: one session generating from one prompt. A request's choices share
    its id and creation time."""

    prompt_ids: list[int]
    params: SamplingParams
    session_id: str
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    index: int = 0  # the choice's index in the response
    prompt_text: str = ""  # what `echo` repeats: the prompt as given, or its ids decoded


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
    # With params.logprobs: one per token of `token_ids`. With params.prompt_logprobs: the prompt's
    # (tokens 1..), on the first delta.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def tau(self) -> float:
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the request's own for the first (so n = 1 is unchanged), a distinct one
    derived from it for the others, so n seeded choices are n different, reproducible samples."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (MAX_SEED + 1)


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
        model: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens
        self.store = store
        self.draft_workers = draft_workers
        self.metrics = metrics
        self.limits = limits or RequestLimits()
        self.admission = Admission(self.limits)
        self.failover = failover or Failover()
        self.model = model  # the one model served: requests naming another get ModelNotFound
        self._in_flight: Counter[str] = Counter()  # this router's open sessions per verifier

    # ---- request building -----------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        """ModelNotFound unless `model` is empty or the served model's id."""
        if model and model != self.model:
            raise ModelNotFound(model)

    def build(
        self,
        *,
        prompts: Sequence[Prompt] | None,
        messages: list[dict[str, str]] | None,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        seed: int | None,
        stop: list[str],
        session_id: str | None,
        n: int = 1,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        id_prefix: str = "cmpl",
    ) -> list[GenerationRequest]:
        """The request's choices: n per prompt, prompt by prompt (OpenAI's choice index order)."""
        if (prompts is None) == (messages is None):
            raise RequestError("give exactly one of prompt or messages", "prompt" if prompts else "messages")
        if prompts is not None and not prompts:
            raise RequestError("the prompt is empty", "prompt")
        check_request(
            prompts=prompts,
            messages=messages,
            stop=stop,
            seed=seed,
            top_k=top_k,
            session_id=session_id,
            n=n,
        )
        if n * len(prompts or [None]) > self.limits.max_concurrent_requests:
            raise RequestError(
                f"this server generates at most {self.limits.max_concurrent_requests} choices at once",
                "n",
            )
        try:
            params = SamplingParams(
                max_tokens=max_tokens or self.default_max_tokens,
                temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                top_k=top_k or 0,
                seed=seed,
                stop=tuple(stop),
                presence_penalty=presence_penalty or 0.0,
                frequency_penalty=frequency_penalty or 0.0,
                repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except ParamError as err:
            raise RequestError(str(err), err.param) from err
        if messages is not None:
            tokenized = [(self._chat_ids(messages), "", "messages")]
        else:
            tokenized = [self._prompt_ids(p, i, len(prompts)) for i, p in enumerate(prompts)]
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        requests = []
        for p, (prompt_ids, prompt_text, param) in enumerate(tokenized):
            if not prompt_ids:
                raise RequestError("the prompt is empty", param)
            try:
                check_context(len(prompt_ids), params.max_tokens, self.max_context)
            except ValueError as err:
                raise RequestError(
                    str(err), param if len(prompt_ids) >= self.max_context else "max_tokens"
                ) from err
            for i in range(n):
                choice_params = dataclasses.replace(
                    params,
                    seed=choice_seed(seed, i),
                    # The prompt's logprobs are the same for each of its choices: computed once.
                    prompt_logprobs=prompt_logprobs if i == 0 else None,
                )
                requests.append(
                    GenerationRequest(
                        prompt_ids,
                        choice_params,
                        session_id or f"sess-{uuid.uuid4().hex}",
                        request_id,
                        created,
                        p * n + i,
                        prompt_text,
                    )
                )
        return requests

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        # The template sees `developer` as `system`, the role it replaces in OpenAI's API.
        messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        return list(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    def _prompt_ids(self, prompt: Prompt, index: int, count: int) -> tuple[list[int], str, str]:
        """(token ids, text to echo, the field to name in an error) of one completions prompt."""
        param = "prompt" if count == 1 else f"prompt[{index}]"
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]), prompt, param
        ids = list(prompt)
        vocab = len(self.tokenizer)
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"{param}: token ids must be integers in [0, {vocab})", param)
        return ids, self.tokenizer.decode(ids), param

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
                raise RequestError(f"session {session_id} already has a request in flight", "session_id")
            owner = next((v for v in verifiers if v.verifier_id == record.get("verifier")), None)
            if owner is not None:
                return owner
        return min(
            verifiers, key=lambda v: (self._in_flight[v.verifier_id], v.active_sessions, random.random())
        )

    # ---- streaming ------------------------------------------------------------------------------
    async def stream(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, text delta) as the verifiers commit tokens, the choices interleaved; each
        choice's last delta carries its finish_reason and stats.

        Overloaded when this router cannot take all of the request's choices now.
        """
        with self.admission.slot(len(requests)):
            if len(requests) == 1:
                async with aclosing(self._stream(requests[0])) as deltas:
                    async for delta in deltas:
                        yield requests[0].index, delta
                return
            async with aclosing(self._merged(requests)) as merged:
                async for item in merged:
                    yield item

    async def _merged(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Delta]]:
        """Every choice's deltas as they come; the first failure ends all of them."""
        queue: asyncio.Queue[tuple[int, Delta | None, Exception | None]] = asyncio.Queue()

        async def pump(request: GenerationRequest) -> None:
            try:
                async with aclosing(self._stream(request)) as deltas:
                    async for delta in deltas:
                        await queue.put((request.index, delta, None))
            except Exception as err:  # handed to the consumer, which raises it
                await queue.put((request.index, None, err))
                return
            await queue.put((request.index, None, None))

        tasks = [asyncio.create_task(pump(r)) for r in requests]
        try:
            running = len(tasks)
            while running:
                index, delta, err = await queue.get()
                if err is not None:
                    raise err
                if delta is None:
                    running -= 1
                else:
                    yield index, delta
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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
                catch_up=request.params.logprobs is None,
            )
            output_ids: list[int] = []
            logprobs: list[TokenLogprob] = []  # of tokens not yet in a delta
            prompt_logprobs: list[TokenLogprob] | None = None  # until the first delta takes them
            prompt_logprobs_seen = False  # a resumed path's prefill brings them again
            sent = 0
            steps = drafts = accepted = 0
            # While stop strings may still match, the last characters are held back (they may be cut).
            hold = max(map(len, request.params.stop), default=1) - 1
            async with aclosing(chunks):
                async for chunk in chunks:
                    output_ids += chunk.tokens
                    logprobs += chunk.logprobs
                    if chunk.prompt_logprobs and not prompt_logprobs_seen:
                        prompt_logprobs, prompt_logprobs_seen = list(chunk.prompt_logprobs), True
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
                            logprobs,
                            prompt_logprobs,
                        )
                        return
                    # A trailing U+FFFD is a partial UTF-8 character the next token completes.
                    visible = len(text) - (1 if text.endswith("\ufffd") else 0) - hold
                    if visible > sent or chunk.tokens:
                        yield Delta(
                            text[sent : max(visible, sent)],
                            list(chunk.tokens),
                            logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs,
                        )
                        logprobs, prompt_logprobs = [], None
                        sent = max(visible, sent)

    async def complete(self, requests: list[GenerationRequest]) -> list[Delta]:
        """Each choice's whole completion as one delta, in choice order."""
        parts: dict[int, list[Delta]] = {r.index: [] for r in requests}
        async for index, delta in self.stream(requests):
            parts[index].append(delta)
        return [_joined(parts[r.index]) for r in requests]


def _joined(deltas: list[Delta]) -> Delta:
    last = deltas[-1]
    return Delta(
        "".join(d.text for d in deltas),
        [t for d in deltas for t in d.token_ids],
        last.finish_reason,
        last.completion_tokens,
        last.verify_steps,
        last.draft_tokens,
        last.accepted_tokens,
        [lp for d in deltas for lp in d.logprobs],
        next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None),
    )
