"""The verifier's engine: sessions, a segment queue and the batching loop, without any transport.

Draft workers open a session (prefill), then send one `DraftSegment` at a time. Each step takes
every queued segment from every session (continuous batching, arrival order, under the token
budget), runs one target forward, verifies the drafts losslessly and answers each segment with its
accepted prefix and correction/bonus token. The gRPC servicer and the in-process transport both
drive `handle()`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.drafters.base import DraftProposal
from specray.workers.model_runner import ModelRunner, ScheduledSequence
from specray.workers.models.loader import LoadedModel
from specray.workers.protocol import decode_params, decode_tensor, encode_tensor
from specray.workers.sequence import Sequence, Status
from specray.workers.stopping import append_tokens
from specray.workers.verification import verify_drafts

Code = pb.VerifyError.Code


@dataclass(frozen=True)
class VerifierConfig:
    max_drafts: int = 16  # longest segment accepted
    max_num_seqs: int = 64  # sessions batched per step
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int = 32768
    block_size: int = 16
    feature_layers: tuple[int, ...] = ()  # target layers whose hidden states feed the drafter

    def __post_init__(self) -> None:
        if self.max_drafts < 0:
            raise ValueError("max_drafts must be >= 0")
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
    proposal: DraftProposal
    done: asyncio.Future = field(repr=False)

    @property
    def pending(self) -> list[int]:
        return self.seq.token_ids[self.seq.num_computed :]


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
        self._queue: list[_Job] = []
        self._in_flight: set[str] = set()  # sessions with a queued or running job
        self._to_free: list[str] = []  # closed sessions, freed between steps (never under a forward)
        self._reserved_blocks = 0
        # Set whenever there is work (a queued job or a session to free); binds to no loop until used.
        self._wakeup = asyncio.Event()

    # ---- protocol ------------------------------------------------------------------------------
    async def handle(self, message: pb.DraftMessage) -> pb.VerifyMessage | None:
        """Answer one message of a session's stream (None for a close)."""
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
        except ValueError as err:
            raise SegmentRejected(Code.INVALID, str(err)) from err
        if len(tokens) + params.max_tokens > self.max_context:
            raise SegmentRejected(
                Code.INVALID, f"prompt + max_tokens exceeds the model's context of {self.max_context} tokens"
            )
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, (1,))))
        seq = Sequence(sid, tokens, params, generator, status=Status.RUNNING)
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
            except ValueError as err:
                raise SegmentRejected(Code.INVALID, str(err)) from err
            if tuple(probs.shape) != (len(tokens), self.vocab_size):
                raise SegmentRejected(Code.INVALID, f"draft_probs must be [{len(tokens)}, {self.vocab_size}]")
        proposal = DraftProposal(tokens, probs, list(segment.confidence) or None)
        return _Job(seq, segment.segment_id, proposal, asyncio.get_running_loop().create_future())

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
            batch = self._take_batch()
            if not batch:
                continue
            try:
                replies = await asyncio.to_thread(self._step, batch)
            except Exception as err:  # a failed forward fails its segments, not the replica
                replies = [
                    _error(j.seq.seq_id, j.segment_id, Code.UNKNOWN, repr(err), j.seq.num_tokens)
                    for j in batch
                ]
            for job, reply in zip(batch, replies):
                self._in_flight.discard(job.seq.seq_id)
                if job.seq.finished:
                    self.close(job.seq.seq_id)
                if not job.done.done():
                    job.done.set_result(reply)
            if self._queue or self._to_free:
                self._wakeup.set()

    def _take_batch(self) -> list[_Job]:
        budget = self.config.max_num_batched_tokens
        batch: list[_Job] = []
        for job in list(self._queue):
            if job.seq.finished:  # closed while queued
                self._queue.remove(job)
                self._in_flight.discard(job.seq.seq_id)
                job.done.cancel()
                continue
            cost = len(job.pending) + len(job.proposal.tokens)
            if batch and (cost > budget or len(batch) >= self.config.max_num_seqs):
                break
            batch.append(job)
            self._queue.remove(job)
            budget -= cost
        return batch

    def _step(self, batch: list[_Job]) -> list[pb.VerifyMessage]:
        pendings = [job.pending for job in batch]
        out = self.runner.run(
            [
                ScheduledSequence(job.seq.seq_id, pending + job.proposal.tokens, 1 + len(job.proposal.tokens))
                for job, pending in zip(batch, pendings)
            ]
        )
        verdicts = verify_drafts([j.seq for j in batch], [j.proposal for j in batch], out.logits)
        self.steps += 1
        replies = []
        for i, (job, pending, (accepted, emitted)) in enumerate(zip(batch, pendings, verdicts)):
            seq = job.seq
            start = seq.num_computed
            seq.num_computed = start + len(pending) + accepted
            self.runner.rollback(seq.seq_id, seq.num_computed)
            seq.stats.record(len(job.proposal.tokens), accepted)
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
