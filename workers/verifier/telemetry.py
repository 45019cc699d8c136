"""What the verifier's batching loop reports about each step: counters and spans.

Counters (`VerifierStats`) feed `/metrics` and the verifier pool's autoscaling policy. Spans: one
step serves many sessions, each in its own request's trace, so every segment of the batch gets its
own `specray.verify` span (parent: the context its draft worker sent in the stream's metadata) with
three children that share the step's timestamps: `specray.schedule` (taking and scheduling the
batch), `specray.forward` (the target forward) and `specray.accept` (verification and the replies).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry import trace

from specray.cluster.runtime import tracing
from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.worker_stats import VerifierStats

if TYPE_CHECKING:
    from specray.workers.verifier.core import _Job

_PHASES = ("specray.schedule", "specray.forward", "specray.accept")


class VerifierTelemetry:
    def __init__(self, token_budget: int) -> None:
        self.stats = VerifierStats(token_budget)
        self._marks: list[int] = []  # ns: step start, scheduled, forward done, replies built
        self._tokens = 0

    def begin_step(self) -> None:
        self._marks = [time.time_ns()]

    def scheduled(self, batch: Sequence[_Job]) -> None:
        """The batch is taken and its drafts cut to what the step verifies."""
        self._tokens = sum(len(job.pending) + len(job.proposal.tokens) for job in batch)
        self._marks.append(time.time_ns())

    def forward_done(self) -> None:
        self._marks.append(time.time_ns())

    def end_step(self, batch: Sequence[_Job], replies: Sequence[pb.VerifyMessage]) -> None:
        self._marks.append(time.time_ns())
        self.stats.record_batch(len(batch), self._tokens)
        if len(self._marks) != 4:  # the forward failed before it finished: no phase split to show
            self._marks.insert(2, self._marks[-1])
        tracer = tracing.tracer()
        for job, reply in zip(batch, replies):
            if job.trace_context is None:
                continue
            attributes = {
                tracing.SESSION_ID: job.seq.seq_id,
                tracing.SEGMENT_ID: job.segment_id,
                tracing.BATCH_SIZE: len(batch),
                tracing.BATCH_TOKENS: self._tokens,
                "specray.token_budget": self.stats.token_budget,
            }
            if reply.WhichOneof("kind") == "result":
                result = reply.result
                attributes[tracing.SEGMENT_LENGTH] = result.num_proposed or result.num_drafts
                attributes["specray.verified_drafts"] = result.num_drafts
                attributes[tracing.ACCEPTED] = result.accepted
                if result.HasField("verify_budget"):
                    attributes[tracing.VERIFY_BUDGET] = result.verify_budget
            span = tracer.start_span(
                "specray.verify",
                job.trace_context,
                trace.SpanKind.SERVER,
                attributes,
                start_time=self._marks[0],
            )
            if reply.WhichOneof("kind") == "error":
                span.set_status(trace.Status(trace.StatusCode.ERROR, reply.error.message))
            for name, start, end in zip(_PHASES, self._marks, self._marks[1:]):
                tracer.start_span(name, tracing.child_of(span), start_time=start).end(end_time=end)
            span.end(end_time=self._marks[-1])
