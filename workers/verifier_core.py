"""The verifier's engine: sessions, a segment queue and the batching loop, without any transport.

Draft workers open a session (prefill), then send one `DraftSegment` at a time. Each step takes
queued segments from many sessions (continuous batching, under the sequence and token limits) in
priority order: segments that already waited a step first, then by expected accepted length (the sum
of their survival probabilities). The confidence scheduler then decides how many of each segment's
drafts the step verifies (DSpark Algorithm 1 over the profiled step curve); the dropped tails are
redrafted by the draft worker from the new committed position. One target forward, lossless
verification, and each segment gets its accepted prefix, correction/bonus token and the verify
budget to draft for next. The gRPC servicer and the in-process transport both drive `handle()`.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import torch
from opentelemetry.context import Context

from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.confidence_scheduler import (
    POLICIES,
    SchedulingPolicy,
    VerifyScheduler,
    expected_accepted,
)
from specray.workers.drafters.base import DraftProposal
from specray.workers.model_runner import ModelRunner, ScheduledSequence
from specray.workers.models.loader import LoadedModel
from specray.workers.protocol import decode_params, decode_tensor, encode_tensor
from specray.workers.segment_validation import check_draft_probs, split_resumed
from specray.workers.sequence import Sequence, Status
from specray.workers.step_curve import StepCurve
from specray.workers.stopping import append_tokens
from specray.workers.verification import verify_drafts
from specray.workers.verifier_telemetry import VerifierTelemetry

Code = pb.VerifyError.Code


@dataclass(frozen=True)
class VerifierConfig:
    max_drafts: int = 16  # longest segment accepted
    max_num_seqs: int = 64  # sessions batched per step
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int = 32768
    block_size: int = 16
    feature_layers: tuple[int, ...] = ()  # target layers whose hidden states feed the drafter
    # How many of a segment's drafts a step verifies: all (`fixed`), DSpark Algorithm 1 over
    # `step_curve` (`confidence`; drafts without confidences count `confidence_prior` each), or
    # none (`off`: autoregressive).
    scheduling: SchedulingPolicy = "fixed"
    step_curve: StepCurve | None = None
    confidence_prior: float = 0.6

    def __post_init__(self) -> None:
        if self.max_drafts < 0:
            raise ValueError("max_drafts must be >= 0")
        if self.scheduling not in POLICIES:
            raise ValueError(f"scheduling must be one of {POLICIES}")
        if self.scheduling == "confidence" and self.step_curve is None:
            raise ValueError("confidence scheduling needs a step curve")
        if not 0.0 <= self.confidence_prior <= 1.0:
            raise ValueError("confidence_prior must lie in [0, 1]")
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.kv_cache_tokens, self.block_size) < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens, kv_cache_tokens, block_size must be >= 1")


class SegmentRejected(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Job:
    seq: Sequence
    segment_id: int
    proposal: DraftProposal  # truncated to the verified drafts once the job is scheduled
    done: asyncio.Future = field(repr=False)
    priority: float = 0.0  # expected accepted drafts: Σ_j Π_{i≤j} c_i
    arrival: int = 0
    steps_waited: int = 0  # steps that ran while this job stayed queued
    num_proposed: int = 0  # drafts the segment carried
    trace_context: Context | None = None  # the request's trace, for this job's spans

    @property
    def pending(self) -> list[int]:
        return self.seq.token_ids[self.seq.num_computed :]


@dataclass
class VerifyCounters:
    """Totals over decode segments since start-up (the Stats RPC reports them)."""

    segments: int = 0
    proposed_drafts: int = 0
    verified_drafts: int = 0
    accepted_drafts: int = 0


class VerifierCore:
    def __init__(self, target: LoadedModel, config: VerifierConfig | None = None) -> None:
        self.target = target
        self.config = config or VerifierConfig()
        self.runner = ModelRunner(
            target.model, self.config.kv_cache_tokens, self.config.block_size, self.config.feature_layers
        )
        self.vocab_size = target.config.vocab_size
        self.max_context = target.config.max_position_embeddings
        self.sessions: dict[str, Sequence] = {}
        self.steps = 0
        self.counters = VerifyCounters()
        self.telemetry = VerifierTelemetry(self.config.max_num_batched_tokens)
        self.scheduler = VerifyScheduler(
            self.config.scheduling, self.config.step_curve, self.config.confidence_prior
        )
        self._arrivals = itertools.count()
        self._queue: list[_Job] = []
        self._in_flight: set[str] = set()  # sessions with a queued or running job
        self._to_free: list[str] = []  # closed sessions, freed between steps (never under a forward)
        self._reserved_blocks = 0
        # Set whenever there is work (a queued job or a session to free); binds to no loop until used.
        self._wakeup = asyncio.Event()

    # ---- protocol ------------------------------------------------------------------------------
    async def handle(
        self, message: pb.DraftMessage, trace_context: Context | None = None
    ) -> pb.VerifyMessage | None:
        """Answer one message of a session's stream (None for a close); `trace_context`: the
        request's trace, which this message's step spans join."""
        kind = message.WhichOneof("kind")
        if kind == "close":
            self.close(message.close.session_id)
            return None
        if kind == "open":
            session_id, segment_id = message.open.session_id, 0
        elif kind == "segment":
            session_id, segment_id = message.segment.session_id, message.segment.segment_id
        else:
            return _error("", 0, Code.INVALID, "empty DraftMessage", 0)
        try:
            job = self._open(message.open) if kind == "open" else self._segment(message.segment)
        except SegmentRejected as err:
            seq = self.sessions.get(session_id)
            return _error(session_id, segment_id, err.code, str(err), seq.num_tokens if seq else 0)
        job.arrival = next(self._arrivals)
        job.trace_context = trace_context
        self._queue.append(job)
        self._in_flight.add(session_id)
        self._wake()
        return await job.done

    def close(self, session_id: str) -> None:
        """Forget a session (client gone or done); its KV is freed before the next step."""
        seq = self.sessions.pop(session_id, None)
        if seq is not None:
            seq.finish(seq.finish_reason or "abort")
            self._to_free.append(session_id)
            self._reserved_blocks -= self._blocks_for(seq)
            self._wake()

    @property
    def queued_segments(self) -> int:
        return len(self._queue)

    @property
    def kv_blocks_used(self) -> int:
        return self.runner.kv.num_blocks - self.runner.kv.num_free_blocks

    def _open(self, open_msg: pb.OpenSession) -> _Job:
        sid = open_msg.session_id
        if not sid:
            raise SegmentRejected(Code.INVALID, "session_id is empty")
        if sid in self.sessions:
            raise SegmentRejected(Code.INVALID, f"session {sid} is already open")
        tokens = list(open_msg.token_ids)
        if not tokens or any(t >= self.vocab_size for t in tokens):
            raise SegmentRejected(Code.INVALID, f"token ids must be non-empty and in [0, {self.vocab_size})")
        try:
            params = decode_params(open_msg.params)
            # A resumed session re-prefills its committed output, which counts against max_tokens.
            prompt, output = split_resumed(tokens, open_msg.prompt_len, params.max_tokens)
        except ValueError as err:
            raise SegmentRejected(Code.INVALID, str(err)) from err
        if len(prompt) + params.max_tokens > self.max_context:
            raise SegmentRejected(
                Code.INVALID, f"prompt + max_tokens exceeds the model's context of {self.max_context} tokens"
            )
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, (1,))))
        seq = Sequence(sid, prompt, params, generator, output_ids=output, status=Status.RUNNING)
        need = self._blocks_for(seq)
        if self._reserved_blocks + need > self.runner.kv.num_blocks:
            raise SegmentRejected(Code.EXHAUSTED, "the verifier's KV cache is full")
        self._reserved_blocks += need
        self.sessions[sid] = seq
        loop = asyncio.get_running_loop()
        return _Job(seq, 0, DraftProposal(tokens=[]), loop.create_future())

    def _segment(self, segment: pb.DraftSegment) -> _Job:
        seq = self.sessions.get(segment.session_id)
        if seq is None:
            raise SegmentRejected(Code.NOT_OPEN, f"session {segment.session_id!r} is not open here")
        if segment.session_id in self._in_flight:
            raise SegmentRejected(Code.INVALID, "a segment of this session is already being verified")
        if segment.committed_len != seq.num_tokens:
            raise SegmentRejected(
                Code.STALE,
                f"segment builds on {segment.committed_len} tokens, the session has {seq.num_tokens}",
            )
        tokens = list(segment.tokens)
        limit = min(
            self.config.max_drafts,
            seq.params.max_tokens - len(seq.output_ids) - 1,
            self.max_context - seq.num_tokens - 1,
        )
        if len(tokens) > max(limit, 0):
            raise SegmentRejected(Code.INVALID, f"{len(tokens)} drafts exceed the {max(limit, 0)} allowed")
        if any(t >= self.vocab_size for t in tokens):
            raise SegmentRejected(Code.INVALID, f"draft token ids must be in [0, {self.vocab_size})")
        probs = None
        if segment.HasField("draft_probs"):
            try:
                probs = decode_tensor(segment.draft_probs)
                check_draft_probs(probs, tokens, self.vocab_size)
            except ValueError as err:
                raise SegmentRejected(Code.INVALID, str(err)) from err
        confidence = list(segment.confidence) or None
        if confidence is not None and (
            len(confidence) != len(tokens) or not all(0.0 <= c <= 1.0 for c in confidence)
        ):
            raise SegmentRejected(Code.INVALID, "confidence needs one value in [0, 1] per draft")
        proposal = DraftProposal(tokens, probs, confidence)
        # Queue order by survival, computed here from the confidences rather than taken on trust.
        (survival,) = self.scheduler.survival_inputs([len(tokens)], [confidence])
        return _Job(
            seq,
            segment.segment_id,
            proposal,
            asyncio.get_running_loop().create_future(),
            priority=expected_accepted(survival),
            num_proposed=len(tokens),
        )

    def _blocks_for(self, seq: Sequence) -> int:
        # The worst case up front, as the engine does, so a running session never runs out of KV.
        return self.runner.kv.blocks_needed(
            len(seq.prompt_ids) + seq.params.max_tokens + self.config.max_drafts + 1
        )

    def _wake(self) -> None:
        self._wakeup.set()

    # ---- the batching loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve steps forever; the forward runs in a thread so the event loop keeps taking segments."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            for sid in self._to_free:
                self.runner.free(sid)
            self._to_free.clear()
            self.telemetry.begin_step()
            batch = self._take_batch()
            if not batch:
                continue
            self.telemetry.scheduled(batch)
            try:
                replies = await asyncio.to_thread(self._step, batch)
            except Exception as err:  # a failed forward fails its segments, not the replica
                replies = [
                    _error(j.seq.seq_id, j.segment_id, Code.UNKNOWN, repr(err), j.seq.num_tokens)
                    for j in batch
                ]
            self.telemetry.end_step(batch, replies)
            for job, reply in zip(batch, replies):
                self._in_flight.discard(job.seq.seq_id)
                if job.seq.finished:
                    self.close(job.seq.seq_id)
                if not job.done.done():
                    job.done.set_result(reply)
            if self._queue or self._to_free:
                self._wakeup.set()

    def _take_batch(self) -> list[_Job]:
        """The next step's jobs, their proposals cut to the drafts the scheduler admits."""
        for job in [j for j in self._queue if j.seq.finished]:  # closed while queued
            self._queue.remove(job)
            self._in_flight.discard(job.seq.seq_id)
            job.done.cancel()
        # High priority first: whatever already waited a step (so nothing starves), then the
        # segments expected to yield the most tokens, then arrival order.
        self._queue.sort(key=lambda j: (-j.steps_waited, -j.priority, j.arrival))
        budget = self.config.max_num_batched_tokens
        # Under `fixed` every draft is verified, so it counts now; otherwise the scheduler spends
        # what the anchors leave.
        drafts_count = self.config.scheduling == "fixed"
        batch: list[_Job] = []
        for job in list(self._queue):
            cost = len(job.pending) + (len(job.proposal.tokens) if drafts_count else 0)
            if batch and (cost > budget or len(batch) >= self.config.max_num_seqs):
                break
            batch.append(job)
            self._queue.remove(job)
            budget -= cost
        for job in self._queue:
            job.steps_waited += 1
        if batch and not drafts_count:
            self._schedule(batch)
        return batch

    def _schedule(self, batch: list[_Job]) -> None:
        lengths = self.scheduler.budgets(
            [len(j.proposal.tokens) for j in batch],
            [j.proposal.confidence for j in batch],
            base_tokens=sum(len(j.pending) for j in batch),
            max_tokens=max(self.config.max_num_batched_tokens, sum(len(j.pending) for j in batch)),
        )
        for job, keep in zip(batch, lengths):
            job.proposal = job.proposal.prefix(keep)

    def _verify_budget(self, job: _Job) -> int:
        """Drafts to send next: what this step verified plus one, so the budget can grow back
        toward γ as load falls (and shrinks to a single probe draft under saturation)."""
        if self.config.scheduling == "off":
            return 0
        if self.config.scheduling == "fixed" or job.segment_id == 0:  # fixed, or nothing known yet
            return self.config.max_drafts
        return min(self.config.max_drafts, len(job.proposal.tokens) + 1)

    def _step(self, batch: list[_Job]) -> list[pb.VerifyMessage]:
        pendings = [job.pending for job in batch]
        out = self.runner.run(
            [
                ScheduledSequence(job.seq.seq_id, pending + job.proposal.tokens, 1 + len(job.proposal.tokens))
                for job, pending in zip(batch, pendings)
            ]
        )
        self.telemetry.forward_done()
        verdicts = verify_drafts([j.seq for j in batch], [j.proposal for j in batch], out.logits)
        self.steps += 1
        replies = []
        for i, (job, pending, (accepted, emitted)) in enumerate(zip(batch, pendings, verdicts)):
            seq = job.seq
            start = seq.num_computed
            seq.num_computed = start + len(pending) + accepted
            self.runner.rollback(seq.seq_id, seq.num_computed)
            seq.stats.record(len(job.proposal.tokens), accepted)
            if job.segment_id:
                self.counters.segments += 1
                self.counters.proposed_drafts += job.num_proposed
                self.counters.verified_drafts += len(job.proposal.tokens)
                self.counters.accepted_drafts += accepted
            committed = append_tokens(
                seq, emitted, self.target.stop_token_ids, self.target.tokenizer, self.max_context
            )
            result = pb.VerifyResult(
                session_id=seq.seq_id,
                segment_id=job.segment_id,
                committed_len=seq.num_tokens,
                num_drafts=len(job.proposal.tokens),
                accepted=accepted,
                tokens=committed,
                finished=seq.finished,
                finish_reason=seq.finish_reason or "",
                stop_text_len=-1 if seq.stop_text_len is None else seq.stop_text_len,
                num_proposed=job.num_proposed,
                verify_budget=self._verify_budget(job),
            )
            if out.features is not None:
                result.features.CopyFrom(encode_tensor(out.features[i][: len(pending) + accepted]))
                result.feature_start = start
            replies.append(pb.VerifyMessage(result=result))
        return replies


def _error(session_id: str, segment_id: int, code: int, message: str, committed_len: int) -> pb.VerifyMessage:
    return pb.VerifyMessage(
        error=pb.VerifyError(
            session_id=session_id,
            segment_id=segment_id,
            code=code,
            message=message,
            committed_len=committed_len,
        )
    )
