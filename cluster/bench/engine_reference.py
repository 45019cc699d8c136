"""The in-process engine as `specray bench serve`'s reference: the same work with no cluster around it.

Same target (model, dtype), drafter, γ, scheduling, step curve, token budget and torch threads as
the verifier, and the same load: a closed loop of `concurrency` clients, each sending its next
prompt when its last one finished, which in one engine means a batch of `concurrency` sequences
with the next prompt added as soon as one finishes. Cluster ÷ engine is what the cluster costs.
"""

from __future__ import annotations

import time
from collections import deque

from specray.cluster.bench.request_timing import RequestTiming
from specray.cluster.bench.step_counters import StepCounters
from specray.cluster.runtime.config import ClusterConfig
from specray.workers.drafters.registry import build_drafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.engine.scheduling_policy import policy_class
from specray.workers.engine.sequence import Sequence
from specray.workers.engine.step_curve import StepCurve
from specray.workers.models.loader import LoadedModel


def reference_engine(
    target: LoadedModel, config: ClusterConfig, concurrency: int, step_curve: StepCurve | None
) -> LLMEngine:
    """An engine configured as `config`'s verifier, batching up to `concurrency` sequences."""
    drafts = policy_class(config.scheduling).drafts
    pool = config.verifiers
    return LLMEngine(
        target,
        build_drafter(config.drafter, target) if drafts else None,
        EngineConfig(
            num_speculative_tokens=config.num_speculative_tokens if drafts else 0,
            max_num_seqs=concurrency,
            max_num_batched_tokens=pool.max_num_batched_tokens,
            kv_cache_tokens=pool.kv_cache_tokens,
            scheduling=config.scheduling,
            step_curve=step_curve,
            confidence_prior=config.confidence_prior,
        ),
    )


def closed_loop(
    engine: LLMEngine, prompt_ids: list[list[int]], max_tokens: int
) -> tuple[list[RequestTiming], StepCounters]:
    """Every prompt once (greedy), `engine.config.max_num_seqs` in flight; timings in prompt order.

    Its counters count as the verifiers do: decode request-steps leave out each request's first
    (its prefill), although here the prefill step may verify drafts too (rarely: a prompt that
    repeats itself gives the n-gram drafter something to propose)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    queue = deque(range(len(prompt_ids)))
    timings = [RequestTiming() for _ in prompt_ids]
    in_flight: dict[str, tuple[int, float]] = {}  # seq id -> (prompt index, when it was sent)
    seqs: list[Sequence] = []

    def send() -> None:
        i = queue.popleft()
        seqs.append(engine.add_request(prompt_ids[i], params, seq_id=f"reference-{i}"))
        in_flight[seqs[-1].seq_id] = (i, time.perf_counter())

    for _ in range(min(engine.config.max_num_seqs, len(queue))):
        send()
    forwards = 0
    while in_flight:
        outputs = engine.step()
        now = time.perf_counter()
        if not outputs and not engine.has_unfinished():
            raise RuntimeError("the engine has nothing left to run, yet requests are in flight")
        forwards += 1
        for out in outputs:
            i, sent = in_flight[out.seq_id]
            timings[i].arrived(out.new_token_ids, now - sent)
            if out.finished:
                del in_flight[out.seq_id]
                if queue:
                    send()
    return timings, StepCounters(
        steps=sum(seq.stats.verify_steps for seq in seqs) - len(seqs),
        proposed_drafts=None,
        verified_drafts=sum(seq.stats.draft_tokens for seq in seqs),
        accepted_drafts=sum(seq.stats.accepted_tokens for seq in seqs),
        forwards=forwards,
    )
