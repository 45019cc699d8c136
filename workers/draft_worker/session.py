"""One session on the draft side: draft a segment, send it, draft the next while it is verified.

Pipelining: while segment s (built on committed tokens T) is being verified, the drafter already
proposes the continuation of T + s. If the verifier accepts all of s and its bonus token is the
continuation's first token, the rest of the continuation is the next segment and is sent at once;
otherwise (the previous segment was cut short) it is dropped and the drafter starts over from the
new committed tokens. Proposals go through the worker's `DraftBatcher`, in one drafter call with
those of the other sessions ready at the same time.

Draft length: at most γ, and at most the verify budget the verifier reported with its last result
(its scheduler's view of how many drafts of this session it can use under its current load).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from opentelemetry import trace
from opentelemetry.context import Context

from specray.cluster.runtime import tracing
from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.draft_worker.draft_batcher import DraftBatcher
from specray.workers.draft_worker.segment_channel import SegmentChannel
from specray.workers.engine.drafter import DraftProposal, DraftRequest
from specray.workers.engine.request_limits import draft_limit
from specray.workers.engine.sampling import SamplingParams
from specray.workers.protocol import decode_tensor, encode_params, encode_tensor


class VerifyFailed(RuntimeError):
    def __init__(self, error: pb.VerifyError) -> None:
        super().__init__(f"{pb.VerifyError.Code.Name(error.code)}: {error.message}")
        self.code = error.code


@dataclass
class DraftSessionConfig:
    num_speculative_tokens: int = 5  # γ
    max_context: int = 8192
    draft_worker: str = ""  # recorded by the verifier in the session record
    trace_context: Context | None = None  # the request's trace: a `specray.draft` span per segment


async def draft_session(
    channel: SegmentChannel,
    drafter: DraftBatcher | None,
    session_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    config: DraftSessionConfig,
    resumed_output: list[int] | None = None,
) -> AsyncIterator[pb.VerifyResult]:
    """Yield one VerifyResult per verify step (the prefill first) until the session finishes.

    `resumed_output`: the committed output of a session resumed after its verifier or draft worker
    died; the verifier re-prefills prompt + output and generation goes on from there.
    """
    tokens = list(prompt_ids) + list(resumed_output or ())
    generator = params.generator()
    span: trace.Span | None = None  # the segment in flight
    guess: asyncio.Future | None = None  # the continuation being drafted
    try:
        open_msg = pb.OpenSession(
            session_id=session_id,
            token_ids=tokens,
            params=encode_params(params),
            draft_worker=config.draft_worker,
            prompt_len=len(prompt_ids) if resumed_output else 0,
        )
        await channel.send(pb.DraftMessage(open=open_msg))
        result = await _receive(channel, drafter, session_id)
        tokens += result.tokens
        yield result
        ahead: DraftProposal | None = None  # the pipelined continuation, still to be checked
        segment_id = 0
        while not result.finished:
            # From drafting the segment (already done when pipelined) to its verify result.
            span = tracing.tracer().start_span(
                "specray.draft", config.trace_context, attributes={"specray.pipelined": ahead is not None}
            )
            limit = draft_limit(
                config.num_speculative_tokens,
                params.max_tokens,
                len(tokens) - len(prompt_ids),
                len(tokens),
                config.max_context,
                budget=result.verify_budget if result.HasField("verify_budget") else None,
            )
            proposal = (
                ahead.prefix(limit)
                if ahead is not None
                else await _propose(drafter, session_id, tokens, limit, params, generator)
            )
            segment_id += 1
            span.set_attributes(
                {
                    tracing.SESSION_ID: session_id,
                    tracing.SEGMENT_ID: segment_id,
                    tracing.SEGMENT_LENGTH: len(proposal.tokens),
                }
            )
            await channel.send(
                pb.DraftMessage(segment=_segment(session_id, segment_id, len(tokens), proposal))
            )
            # Draft the continuation while the verifier works; one extra token covers the bonus.
            guess = asyncio.ensure_future(
                _propose(
                    drafter,
                    session_id,
                    tokens + proposal.tokens,
                    limit + 1,
                    params,
                    generator,
                    committed=len(tokens),
                )
            )
            result = await _receive(channel, drafter, session_id)
            span.set_attribute(tracing.ACCEPTED, result.accepted)
            span.end()
            tokens += result.tokens
            yield result
            ahead = None
            if result.accepted < len(proposal.tokens):
                guess.cancel()  # it continues drafts the verifier rejected
                continue
            # Every draft accepted: the guess goes on if it starts with the bonus token. (The
            # verifier may have answered before the drafter did: then wait for the drafter.)
            continuation = await guess
            if continuation.tokens[:1] == result.tokens[-1:]:
                ahead = DraftProposal(
                    continuation.tokens[1:],
                    continuation.probs[1:] if continuation.probs is not None else None,
                    continuation.confidence[1:] if continuation.confidence is not None else None,
                )
    finally:
        if span is not None and span.is_recording():  # the session failed mid-segment
            span.end()
        if guess is not None:
            guess.cancel()
        if drafter is not None:
            drafter.release(session_id)
        await channel.close()


async def _receive(channel: SegmentChannel, drafter: DraftBatcher | None, session_id: str) -> pb.VerifyResult:
    reply = await channel.recv()
    if reply.WhichOneof("kind") == "error":
        raise VerifyFailed(reply.error)
    result = reply.result
    if drafter is not None and result.HasField("features"):
        drafter.observe(session_id, decode_tensor(result.features), result.feature_start)
    return result


async def _propose(
    drafter: DraftBatcher | None,
    session_id: str,
    tokens: list[int],
    limit: int,
    params: SamplingParams,
    generator: torch.Generator,
    committed: int | None = None,
) -> DraftProposal:
    if drafter is None or limit <= 0:
        return DraftProposal(tokens=[])
    return await drafter.propose(DraftRequest(session_id, list(tokens), limit, params, generator, committed))


def _segment(
    session_id: str, segment_id: int, committed_len: int, proposal: DraftProposal
) -> pb.DraftSegment:
    segment = pb.DraftSegment(
        session_id=session_id, segment_id=segment_id, committed_len=committed_len, tokens=proposal.tokens
    )
    if proposal.probs is not None and proposal.tokens:
        segment.draft_probs.CopyFrom(encode_tensor(proposal.probs))
    if proposal.confidence is not None:
        segment.confidence.extend(proposal.confidence)
    return segment
