"""The DraftWorker deployment: holds the drafter and runs draft sessions against verifiers over gRPC.

`generate` is a streaming method: the router calls it with a session's prompt and its verifier's
address, and gets one chunk per verify step (the committed tokens). The session itself runs in a
task of its own, so that streaming a chunk to the router never delays the next segment. When the
router goes away, Serve cancels the generator; closing the gRPC stream then makes the verifier free
the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import torch
from opentelemetry.trace import SpanKind
from ray import serve

from specray.cluster.runtime import tracing
from specray.cluster.runtime.config import ClusterConfig
from specray.cluster.runtime.logs import configure_logging
from specray.cluster.runtime.stats_board import DRAFT_POOL, StatsBoard
from specray.protos.specray.v1 import verify_pb2 as pb
from specray.protos.specray.v1 import verify_pb2_grpc
from specray.workers.draft_worker.draft_batcher import DraftBatcher
from specray.workers.draft_worker.messages import SessionChunk, SessionRequest
from specray.workers.draft_worker.session import DraftSessionConfig, VerifyFailed, draft_session
from specray.workers.drafters.registry import build_drafter, check_num_speculative_tokens, needs_target
from specray.workers.engine.drafter import Drafter
from specray.workers.engine.scheduling_policy import policy_class
from specray.workers.models.loader import load_model
from specray.workers.protocol import decode_logprobs
from specray.workers.worker_stats import DraftWorkerStats


class GrpcChannel:
    """One session's bidirectional `Verify` stream."""

    def __init__(self, stub: verify_pb2_grpc.VerifierStub, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._outbox: asyncio.Queue[pb.DraftMessage | None] = asyncio.Queue()
        # metadata: the W3C traceparent, so the verifier's spans join the request's trace.
        self._call = stub.Verify(self._messages(), metadata=tuple(metadata))

    async def _messages(self) -> AsyncIterator[pb.DraftMessage]:
        while (message := await self._outbox.get()) is not None:
            yield message

    async def send(self, message: pb.DraftMessage) -> None:
        await self._outbox.put(message)

    async def recv(self) -> pb.VerifyMessage:
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise ConnectionError("the verifier closed the stream")
        return reply

    async def close(self) -> None:
        await self._outbox.put(None)
        self._call.cancel()


@serve.deployment
class DraftWorker:
    async def __init__(self, config: ClusterConfig) -> None:
        configure_logging(config.log_level)
        torch.set_num_threads(config.draft_workers.torch_threads)
        self.config = config
        # Named after the Serve replica, so a session's draft worker in Redis leads to its actor.
        self.worker_id = f"draft-{serve.get_replica_context().replica_id.unique_id}"
        self.stats = DraftWorkerStats()
        drafter = self._build_drafter(config)
        # Every session's proposals go through one batcher: one drafter call per ready batch.
        self.drafter = DraftBatcher(drafter, self.stats) if drafter is not None else None
        self._channels: dict[str, grpc.aio.Channel] = {}
        tracing.configure_tracing(config.tracing, "draft_worker")
        # The router's /metrics shows every replica's stats through Redis.
        self.stats_board = StatsBoard(config.redis_url) if config.redis_url else None
        self._publisher = (
            asyncio.create_task(
                self.stats_board.publish_forever(DRAFT_POOL, self.worker_id, self.stats.snapshot)
            )
            if self.stats_board is not None
            else None
        )

    @staticmethod
    def _build_drafter(config: ClusterConfig) -> Drafter | None:
        if not policy_class(config.scheduling).drafts:  # autoregressive: nothing to draft
            return None
        check_num_speculative_tokens(config.drafter, config.num_speculative_tokens)
        target = load_model(config.model, config.dtype) if needs_target(config.drafter) else None
        return build_drafter(config.drafter, target)

    def _stub(self, address: str) -> verify_pb2_grpc.VerifierStub:
        # One channel per verifier: every session's stream is multiplexed over it (HTTP/2).
        if address not in self._channels:
            tls = self.config.internal_tls
            self._channels[address] = (
                grpc.aio.insecure_channel(address)
                if tls is None
                else grpc.aio.secure_channel(address, tls.channel_credentials(), tls.channel_options())
            )
        return verify_pb2_grpc.VerifierStub(self._channels[address])

    async def generate(self, request: SessionRequest) -> AsyncIterator[SessionChunk]:
        """Run `request`'s session on its verifier: one chunk per verify step, or an error chunk."""
        span = tracing.tracer().start_span(
            "specray.draft_session",
            tracing.extract(request.trace_context),
            SpanKind.SERVER,
            {tracing.SESSION_ID: request.session_id, "specray.draft_worker": self.worker_id},
        )
        trace_context = tracing.child_of(span)
        session = draft_session(
            GrpcChannel(self._stub(request.verifier_address), tuple(tracing.inject(trace_context).items())),
            self.drafter,
            request.session_id,
            list(request.prompt_ids),
            request.params,
            DraftSessionConfig(
                self.config.num_speculative_tokens if self.drafter is not None else 0,
                request.max_context,
                self.worker_id,
                trace_context,
            ),
            resumed_output=list(request.output_ids) or None,
        )
        self.stats.sessions += 1
        # The session runs on in a task of its own and hands its chunks over a queue: it sends its
        # next segment as soon as a result arrives, while Serve streams that result to the router.
        chunks: asyncio.Queue[SessionChunk | None] = asyncio.Queue()
        task = asyncio.create_task(self._run_session(session, request.verifier_address, chunks))
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
            await task  # raises what ended the session unexpectedly
        finally:
            # Counted closed first: a second cancellation may interrupt the awaits below, and a
            # session counted open forever would hold the draft pool's autoscaler up.
            self.stats.sessions -= 1
            span.end()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await session.aclose()

    async def _run_session(
        self,
        session: AsyncIterator[pb.VerifyResult],
        verifier_address: str,
        chunks: asyncio.Queue[SessionChunk | None],
    ) -> None:
        """Put one chunk per verify step on `chunks`, or an error chunk, then None."""
        try:
            async for result in session:
                if result.segment_id:  # a decode segment, not the prefill
                    self.stats.record(result.num_drafts, result.accepted)
                chunks.put_nowait(
                    SessionChunk(
                        tokens=tuple(result.tokens),
                        num_drafts=result.num_drafts,
                        accepted=result.accepted,
                        finished=result.finished,
                        finish_reason=result.finish_reason or None,
                        stop_text_len=None if result.stop_text_len < 0 else result.stop_text_len,
                        logprobs=decode_logprobs(result.logprobs),
                        prompt_logprobs=decode_logprobs(result.prompt_logprobs),
                    )
                )
        except VerifyFailed as err:
            chunks.put_nowait(SessionChunk.failure(str(err), pb.VerifyError.Code.Name(err.code)))
        except (ConnectionError, grpc.aio.AioRpcError) as err:
            # The verifier is gone; the router answers 503 and the client may retry.
            chunks.put_nowait(
                SessionChunk.failure(f"verifier {verifier_address} unreachable: {err}", "UNAVAILABLE")
            )
        finally:
            chunks.put_nowait(None)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler calls this; the draft pool's policy reads it."""
        return self.stats.autoscaling()

    async def __del__(self) -> None:
        if self.drafter is not None:
            self.drafter.close()
        if self._publisher is not None:
            self._publisher.cancel()
        if self.stats_board is not None:
            await self.stats_board.remove(DRAFT_POOL, self.worker_id)
            await self.stats_board.close()
