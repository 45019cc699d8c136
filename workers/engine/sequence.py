"""A request being generated: its committed tokens, how many of them the KV cache holds, its stats."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from specray.workers.engine.sampling import SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecStats:
    verify_steps: int = 0  # forwards that produced tokens for this sequence
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean tokens committed per verify step, the bonus/correction token included."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.verify_steps += 1
        self.draft_tokens += num_drafts
        self.accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_accepted:
            self.accepted_per_position.extend([0] * (num_accepted - len(self.accepted_per_position)))
        for k in range(num_accepted):
            self.accepted_per_position[k] += 1


@dataclass
class Sequence:
    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading committed tokens whose KV is cached
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_text_len: int | None = None  # output text is cut here when a stop string matched
    stats: SpecStats = field(default_factory=SpecStats)
    # Filled only when the request asked (params.logprobs / params.prompt_logprobs): one entry per
    # output token, and one per prompt token after the first.
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
