"""The verifier's engine: sessions, a segment queue and the batching loop, without any transport.

Draft workers open a session (prefill), then send one `DraftSegment` at a time. A step's sessions
come back together: each gets its result, and its draft worker sends the next segment a network
round trip later. So before a step the loop waits for the sessions of the previous step that have
not sent their next segment yet, up to a fraction of a step's time (`GATHER_WINDOW`); otherwise the
first segment back would start a step of its own and the others the one after, and the sessions
would stay split into half-full steps (on CPU a step of one sequence costs nearly as much as a
step of all). A session that misses the window joins the step after. Each step takes
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

from opentelemetry.context import Context

from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.engine.confidence_scheduler import expected_accepted
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.drafter import DraftProposal
from specray.workers.engine.scheduler import Commit, KVExhausted, ScheduledWork, Scheduler
from specray.workers.engine.sequence import Sequence
from specray.workers.models.loader import LoadedModel
from specray.workers.protocol import decode_params, decode_tensor, encode_logprobs, encode_tensor
from specray.workers.verifier.segment_validation import check_draft_probs, split_resumed
from specray.workers.verifier.telemetry import VerifierTelemetry

Code = pb.VerifyError.Code
# How long a step waits for the previous step's sessions, as a fraction of the recent step time:
# waiting costs the sessions present this long, starting without the late ones costs them a step.
GATHER_WINDOW = 0.5
STEP_TIME_SMOOTHING = 0.2  # weight of the latest step in the running step time


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
    """The engine core driven by segments: a queue of jobs in priority order, batched by the
    shared scheduler, and a reply per job. The gRPC servicer and the tests' in-process channel
    both drive `handle()`."""

    def __init__(
        self, target: LoadedModel, config: EngineConfig | None = None, feature_layers: tuple[int, ...] = ()
    ) -> None:
        self.target = target
        self.config = config or EngineConfig()
        # `feature_layers`: target layers whose hidden states go back to a feature drafter.
        self.scheduler = Scheduler(target, self.config, feature_layers)
        self.policy = self.scheduler.policy
        self.steps = 0
        self.counters = VerifyCounters()
        self.telemetry = VerifierTelemetry(self.config.max_num_batched_tokens)
        self._arrivals = itertools.count()
        self._queue: list[_Job] = []
        self._in_flight: set[str] = set()  # sessions with a queued or running job
        self._returning: set[str] = set()  # the last step's sessions: their next segment is due
        # A step's duration, seconds: running average and last; the smaller bounds the gathering
        # wait (one slow step, e.g. a first forward that compiles a kernel, must not make it long).
        self._step_time = 0.0
        self._last_step_time = 0.0
        # Set whenever there is work (a queued job or a session to free); binds to no loop until used.
        self._wakeup = asyncio.Event()

    @property
    def sessions(self) -> dict[str, Sequence]:
        return self.scheduler.running

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
        if self.scheduler.release(session_id) is not None:
            self._wake()

    @property
    def queued_segments(self) -> int:
        return len(self._queue)

    @property
    def kv_blocks_used(self) -> int:
        return self.scheduler.kv_blocks_used

    @property
    def kv_cache_usage(self) -> float:
        """The share of KV-cache blocks in use, 0 to 1 (vLLM's `kv_cache_usage_perc`)."""
        return self.kv_blocks_used / self.scheduler.runner.kv.num_blocks

    def _open(self, open_msg: pb.OpenSession) -> _Job:
        sid = open_msg.session_id
        if not sid:
            raise SegmentRejected(Code.INVALID, "session_id is empty")
        if sid in self.sessions:
            raise SegmentRejected(Code.INVALID, f"session {sid} is already open")
        try:
            params = decode_params(open_msg.params)
            # A resumed session re-prefills its committed output, which counts against max_tokens.
            prompt, output = split_resumed(list(open_msg.token_ids), open_msg.prompt_len, params.max_tokens)
            seq = self.scheduler.new_sequence(sid, prompt, params, output)
        except ValueError as err:
            raise SegmentRejected(Code.INVALID, str(err)) from err
        try:
            self.scheduler.open(seq)
        except KVExhausted as err:
            raise SegmentRejected(Code.EXHAUSTED, "the verifier's KV cache is full") from err
        return _Job(seq, 0, DraftProposal(tokens=[]), asyncio.get_running_loop().create_future())

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
        limit = self.scheduler.draft_limit(seq)
        if len(tokens) > limit:
            raise SegmentRejected(Code.INVALID, f"{len(tokens)} drafts exceed the {limit} allowed")
        vocab_size = self.scheduler.vocab_size
        if any(not 0 <= t < vocab_size for t in tokens):
            raise SegmentRejected(Code.INVALID, f"draft token ids must be in [0, {vocab_size})")
        probs = None
        if segment.HasField("draft_probs"):
            try:
                probs = decode_tensor(segment.draft_probs)
                check_draft_probs(probs, tokens, vocab_size)
            except ValueError as err:
                raise SegmentRejected(Code.INVALID, str(err)) from err
        confidence = list(segment.confidence) or None
        if confidence is not None and (
            len(confidence) != len(tokens) or not all(0.0 <= c <= 1.0 for c in confidence)
        ):
            raise SegmentRejected(Code.INVALID, "confidence needs one value in [0, 1] per draft")
        proposal = DraftProposal(tokens, probs, confidence)
        # Queue order by survival, computed here from the confidences rather than taken on trust.
        (survival,) = self.policy.survival_inputs([len(tokens)], [confidence])
        return _Job(
            seq,
            segment.segment_id,
            proposal,
            asyncio.get_running_loop().create_future(),
            priority=expected_accepted(survival),
            num_proposed=len(tokens),
        )

    def _wake(self) -> None:
        self._wakeup.set()

    # ---- the batching loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve steps forever; the forward runs in a thread so the event loop keeps taking segments."""
        loop = asyncio.get_running_loop()
        answered = loop.time()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._gather(answered + GATHER_WINDOW * min(self._step_time, self._last_step_time))
            self.scheduler.free_released()
            self.telemetry.begin_step()
            batch = self._take_batch()
            if not batch:
                continue
            self.telemetry.scheduled(batch)
            started = loop.time()
            try:
                replies = await asyncio.to_thread(self._step, batch)
            except Exception as err:  # a failed forward fails its segments, not the replica
                replies = [
                    _error(j.seq.seq_id, j.segment_id, Code.UNKNOWN, repr(err), j.seq.num_tokens)
                    for j in batch
                ]
            answered = loop.time()
            self._last_step_time = answered - started
            self._step_time += STEP_TIME_SMOOTHING * (self._last_step_time - self._step_time)
            self.telemetry.end_step(batch, replies)
            for job, reply in zip(batch, replies):
                self._in_flight.discard(job.seq.seq_id)
                if job.seq.finished:
                    self.close(job.seq.seq_id)
                if not job.done.done():
                    job.done.set_result(reply)
            self._returning = {job.seq.seq_id for job in batch if not job.seq.finished}
            if self._queue or self.scheduler.has_released:
                self._wakeup.set()

    async def _gather(self, deadline: float) -> None:
        """Wait until the last step's sessions have sent their next segments (or closed), or the
        loop's clock reaches `deadline`. Arrivals and closes wake the loop; it re-checks then."""
        loop = asyncio.get_running_loop()
        while self._due() and (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
            self._wakeup.clear()

    def _due(self) -> bool:
        """Whether a session of the last step is still open here without its next segment."""
        self._returning = {
            sid for sid in self._returning if sid in self.sessions and sid not in self._in_flight
        }
        return bool(self._returning)

    def _take_batch(self) -> list[_Job]:
        """The next step's jobs, their proposals cut to the drafts the policy verifies."""
        for job in [j for j in self._queue if j.seq.finished]:  # closed while queued
            self._queue.remove(job)
            self._in_flight.discard(job.seq.seq_id)
            job.done.cancel()
        # High priority first: whatever already waited a step (so nothing starves), then the
        # segments expected to yield the most tokens, then arrival order.
        self._queue.sort(key=lambda j: (-j.steps_waited, -j.priority, j.arrival))
        jobs = {job.seq.seq_id: job for job in self._queue}

        def draft_slots(seq: Sequence, budget: int) -> int:
            # Counted now only where every draft is verified; otherwise the policy spends what the
            # anchors leave once the batch is known.
            return len(jobs[seq.seq_id].proposal.tokens) if self.policy.counts_drafts_up_front else 0

        work = self.scheduler.form_batch([j.seq for j in self._queue], draft_slots, chunked_prefill=False)
        batch = [jobs[w.seq.seq_id] for w in work]
        for job in batch:
            self._queue.remove(job)
        for job in self._queue:
            job.steps_waited += 1
        for w, job in zip(work, batch):
            w.proposal = job.proposal
        self.scheduler.apply_policy(work)
        for w, job in zip(work, batch):
            job.proposal = w.proposal
        return batch

    def _step(self, batch: list[_Job]) -> list[pb.VerifyMessage]:
        work = [ScheduledWork(job.seq, job.pending, job.proposal) for job in batch]
        commits = self.scheduler.execute(work, on_forward_done=self.telemetry.forward_done)
        self.steps += 1
        return [pb.VerifyMessage(result=self._result(job, commit)) for job, commit in zip(batch, commits)]

    def _result(self, job: _Job, commit: Commit) -> pb.VerifyResult:
        seq = commit.seq
        if job.segment_id:
            self.counters.segments += 1
            self.counters.proposed_drafts += job.num_proposed
            self.counters.verified_drafts += commit.num_verified
            self.counters.accepted_drafts += commit.num_accepted
        result = pb.VerifyResult(
            session_id=seq.seq_id,
            segment_id=job.segment_id,
            committed_len=seq.num_tokens,
            num_drafts=commit.num_verified,
            accepted=commit.num_accepted,
            tokens=commit.tokens,
            finished=seq.finished,
            finish_reason=seq.finish_reason or "",
            stop_text_len=-1 if seq.stop_text_len is None else seq.stop_text_len,
            num_proposed=job.num_proposed,
            verify_budget=self.policy.next_draft_budget(
                self.config.num_speculative_tokens, commit.num_verified if job.segment_id else None
            ),
        )
        if commit.logprobs is not None:
            result.logprobs.extend(encode_logprobs(commit.logprobs))
        if commit.prompt_logprobs is not None:
            result.prompt_logprobs.extend(encode_logprobs(commit.prompt_logprobs))
        if commit.features is not None:
            result.features.CopyFrom(encode_tensor(commit.features))
            result.feature_start = commit.feature_start
        return result


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
