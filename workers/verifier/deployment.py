"""The Verifier deployment: the target model behind a `grpc.aio` server that draft workers stream to.

Each replica loads the target, runs a `VerifierCore` batching loop, serves the internal `Verifier`
gRPC service on the configured host (127.0.0.1 by default) and registers its address in Redis,
refreshed by a heartbeat that also publishes its load for the router. Under confidence scheduling it
first reads its step curve SPS(B) from the cache, or profiles it (once per model, dtype and device).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc
import ray
import torch
from ray import serve
from redis.exceptions import RedisError

from specray.cluster.runtime import tracing
from specray.cluster.runtime.config import ClusterConfig
from specray.cluster.runtime.logs import configure_logging
from specray.cluster.runtime.redis_client import OutageLog
from specray.cluster.runtime.session_store import VERIFIER_HEARTBEAT_S, SessionStore
from specray.cluster.runtime.stats_board import VERIFIER_POOL, StatsBoard
from specray.protos.specray.v1 import verify_pb2 as pb
from specray.protos.specray.v1 import verify_pb2_grpc
from specray.workers.drafters.registry import drafter_feature_layers
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.scheduling_policy import policy_class
from specray.workers.engine.step_curve import StepCurve, load_or_profile
from specray.workers.models.loader import LoadedModel, load_model
from specray.workers.protocol import decode_params
from specray.workers.verifier.core import VerifierCore
from specray.workers.verifier.session_bookkeeping import SessionBookkeeping
from specray.workers.worker_stats import VerifierStats

logger = logging.getLogger(__name__)


class VerifierServicer(verify_pb2_grpc.VerifierServicer):
    def __init__(self, verifier_id: str, core: VerifierCore, store: SessionBookkeeping) -> None:
        self.verifier_id = verifier_id
        self.core = core
        self.store = store

    async def Verify(
        self, request_iterator: AsyncIterator[pb.DraftMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.VerifyMessage]:
        session_id: str | None = None
        draft_worker = ""
        output_ids: list[int] = []
        verify_lengths: list[int] = []  # drafts verified per step, recorded with the session
        finished = False
        trace_context = tracing.extract(context.invocation_metadata())  # the draft session's span
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "close":
                    break
                reply = self._check_stream(message, session_id) or await self.core.handle(
                    message, trace_context
                )
                if kind == "open" and reply.WhichOneof("kind") == "result":
                    session_id, draft_worker = message.open.session_id, message.open.draft_worker
                    # A resumed session brings its committed output after the prompt.
                    prompt_len = message.open.prompt_len or len(message.open.token_ids)
                    output_ids = list(message.open.token_ids[prompt_len:])
                    await self.store.open_session(
                        session_id,
                        self.verifier_id,
                        draft_worker,
                        list(message.open.token_ids[:prompt_len]),
                        dataclasses.asdict(decode_params(message.open.params)),
                        output_ids=output_ids,
                    )
                if reply.WhichOneof("kind") == "result" and session_id is not None:
                    result = reply.result
                    output_ids += result.tokens
                    finished = result.finished
                    if kind == "segment":
                        verify_lengths.append(result.num_drafts)
                    written = self.store.record_step(
                        session_id,
                        output_ids,
                        result.committed_len - 1,  # the last committed token is not in the KV yet
                        result.num_drafts,
                        result.accepted,
                        result.finish_reason if finished else None,
                        verify_lengths,
                    )
                    if finished:  # the record says finished before the last token goes out
                        await written
                yield reply
        finally:
            # The stream is over: done, closed by the draft worker, or the client went away.
            if session_id is not None:
                self.core.close(session_id)
                if not finished:
                    # Unless the session was resumed elsewhere meanwhile (its draft worker died).
                    await self.store.delete_session(session_id, owner=(self.verifier_id, draft_worker))

    @staticmethod
    def _check_stream(message: pb.DraftMessage, session_id: str | None) -> pb.VerifyMessage | None:
        """An error reply when the message does not belong on this stream (one session per stream)."""
        kind = message.WhichOneof("kind")
        if kind == "open" and session_id is not None:
            problem = "this stream already carries a session"
        elif kind == "segment" and message.segment.session_id != session_id:
            problem = "the segment's session is not this stream's"
        else:
            return None
        target = message.open.session_id if kind == "open" else message.segment.session_id
        error = pb.VerifyError(session_id=target, code=pb.VerifyError.Code.INVALID, message=problem)
        return pb.VerifyMessage(error=error)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsReply:
        counters = self.core.counters
        return pb.StatsReply(
            verifier_id=self.verifier_id,
            active_sessions=len(self.core.sessions),
            kv_blocks_used=self.core.kv_blocks_used,
            steps=self.core.steps,
            segments=counters.segments,
            proposed_drafts=counters.proposed_drafts,
            verified_drafts=counters.verified_drafts,
            accepted_drafts=counters.accepted_drafts,
            scheduling=self.core.policy.name,
        )


def load_target(config: ClusterConfig) -> LoadedModel:
    """The target as a verifier runs it (`specray serve` loads it the same way to prepare it)."""
    return load_model(config.model, config.dtype)


def load_step_curve(target: LoadedModel, config: ClusterConfig) -> StepCurve | None:
    """The step curve SPS(B) a verifier's scheduling needs (None: it needs none), read from the
    cache or profiled there. Profile with the torch threads the verifier runs with: they are part
    of the cache key."""
    if not policy_class(config.scheduling).needs_step_curve:
        return None
    pool = config.verifiers
    # The range one step can batch: every sequence's anchor and γ drafts, within the token cap.
    batch_range = min(
        pool.max_num_batched_tokens, pool.max_num_seqs * (max(config.num_speculative_tokens, 1) + 1)
    )
    return load_or_profile(target.model, config.model, batch_range)


@serve.deployment
class Verifier:
    async def __init__(self, config: ClusterConfig) -> None:
        if config.redis_url is None:
            raise ValueError("the verifier needs redis_url")
        configure_logging(config.log_level)
        torch.set_num_threads(config.verifiers.torch_threads)
        # Named after the Serve replica, so a session's owner in Redis leads to its actor.
        self.verifier_id = f"verifier-{serve.get_replica_context().replica_id.unique_id}"
        self.node_id = ray.get_runtime_context().get_node_id()  # registered with the address
        self.tls = config.internal_tls
        # Created first so that __del__ finds them even when a later step fails.
        self.store = SessionStore(config.redis_url, config.session_ttl_s, config.finished_ttl_s)
        self.stats_board = StatsBoard(config.redis_url, VERIFIER_HEARTBEAT_S)
        self.server = grpc.aio.server()
        self._tasks: list[asyncio.Task] = []
        tracing.configure_tracing(config.tracing, "verifier")
        target = await asyncio.to_thread(load_target, config)
        pool = config.verifiers
        policy = policy_class(config.scheduling)
        num_speculative_tokens = max(config.num_speculative_tokens, 1)
        step_curve = await asyncio.to_thread(load_step_curve, target, config)
        # A feature drafter (DSpark, EAGLE-3) needs these target layers' hidden states with each
        # result; autoregressive serving drafts nothing and needs none.
        feature_layers = drafter_feature_layers(config.drafter) if policy.drafts else ()
        self.core = VerifierCore(
            target,
            EngineConfig(
                num_speculative_tokens=num_speculative_tokens,
                max_num_seqs=pool.max_num_seqs,
                max_num_batched_tokens=pool.max_num_batched_tokens,
                kv_cache_tokens=pool.kv_cache_tokens,
                scheduling=config.scheduling,
                step_curve=step_curve,
                confidence_prior=config.confidence_prior,
            ),
            feature_layers,
        )
        bookkeeping = SessionBookkeeping(self.store)
        verify_pb2_grpc.add_VerifierServicer_to_server(
            VerifierServicer(self.verifier_id, self.core, bookkeeping), self.server
        )
        self.address = self._bind(pool.host, pool.port_range)
        self._tasks = [
            asyncio.create_task(self.core.run()),
            asyncio.create_task(bookkeeping.run()),
            asyncio.create_task(self._heartbeat()),
        ]
        await self.server.start()
        await self._publish()
        logger.info("verifier %s serving on %s", self.verifier_id, self.address)

    def _bind(self, host: str, port_range: tuple[int, int]) -> str:
        low, high = port_range
        for port in range(low, high + 1):
            try:
                address = f"{host}:{port}"
                if self.tls is None:
                    bound = self.server.add_insecure_port(address)
                else:
                    bound = self.server.add_secure_port(address, self.tls.server_credentials())
            except RuntimeError:
                continue
            if bound:
                # A wildcard bind is not an address peers can dial: advertise this node's IP instead.
                advertised = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "[::]") else host
                return f"{advertised}:{bound}"
        raise RuntimeError(f"no free port for the verifier in {host}:{low}-{high}")

    async def _publish(self) -> None:
        await self.store.heartbeat_verifier(
            self.verifier_id, self.address, len(self.core.sessions), node_id=self.node_id
        )
        await self.stats_board.publish(VERIFIER_POOL, self.verifier_id, self._stats().snapshot())

    def _stats(self) -> VerifierStats:
        stats = self.core.telemetry.stats
        stats.sessions, stats.queued_segments = len(self.core.sessions), self.core.queued_segments
        stats.kv_cache_usage = self.core.kv_cache_usage
        return stats

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler calls this; the verifier pool's policy reads it."""
        return self._stats().autoscaling()

    async def _heartbeat(self) -> None:
        outage = OutageLog(logger, f"{self.verifier_id} heartbeat")
        while True:
            await asyncio.sleep(VERIFIER_HEARTBEAT_S)
            try:
                await self._publish()
                outage.succeeded()
            except RedisError as err:  # Redis away for a moment: the next beat retries
                outage.failed(err)

    def check_health(self) -> None:
        for task in self._tasks:
            if task.done():
                raise RuntimeError(f"verifier task ended: {task}")

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.store.unregister_verifier(self.verifier_id)
        await self.stats_board.remove(VERIFIER_POOL, self.verifier_id)
        await self.server.stop(grace=1.0)
        await self.store.close()
        await self.stats_board.close()
