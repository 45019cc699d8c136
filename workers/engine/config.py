"""The engine core's configuration, shared by the single-process engine and the verifier."""

from __future__ import annotations

from dataclasses import dataclass

from specray.workers.engine.scheduling_policy import policy_class
from specray.workers.engine.step_curve import StepCurve


@dataclass(frozen=True)
class EngineConfig:
    num_speculative_tokens: int = 5  # γ: at most this many drafts verified per sequence per step
    max_num_seqs: int = 16  # sequences batched per step
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int = 16384
    block_size: int = 16  # KV cache page size, in tokens
    # How many drafts each sequence verifies: `fixed` all of them, `confidence` DSpark Algorithm 1
    # over the step curve, `off` none (scheduling_policy.py); drafts without confidences (n-gram)
    # count `confidence_prior` each. Confidence scheduling reads SPS(B) from `step_curve`, or
    # profiles (and caches) it at start-up when none is given.
    scheduling: str = "fixed"
    step_curve: StepCurve | None = None
    confidence_prior: float = 0.6
    # On a GPU, decode and verify steps of up to `max_captured_batch` sequences replay CUDA graphs
    # (cuda_graphs.py), padded to the next captured batch size; larger or mixed steps run eagerly.
    cuda_graphs: bool = True
    max_captured_batch: int = 256

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        policy_class(self.scheduling)
        if not 0.0 <= self.confidence_prior <= 1.0:
            raise ValueError("confidence_prior must lie in [0, 1]")
        sizes = (self.max_num_seqs, self.max_num_batched_tokens, self.kv_cache_tokens, self.block_size)
        if min(*sizes, self.max_captured_batch) < 1:
            raise ValueError(
                "max_num_seqs, max_num_batched_tokens, kv_cache_tokens, block_size and max_captured_batch"
                " must be >= 1"
            )
