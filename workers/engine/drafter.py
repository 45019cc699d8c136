"""The interface every drafter implements (n-gram, DSpark, DFlash, EAGLE-3)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from specray.workers.engine.sampling import SamplingParams


@dataclass
class DraftRequest:
    seq_id: str
    token_ids: list[int]  # the context; the last token is the anchor
    max_tokens: int  # propose at most this many
    params: SamplingParams
    generator: torch.Generator  # the request's own random stream (sampled drafting)
    # How many of token_ids the target has committed (all, unless None says otherwise): a pipelined
    # draft worker drafts ahead from its segment's drafts before the verifier answers.
    committed: int | None = None

    def __post_init__(self) -> None:
        if self.committed is None:
            self.committed = len(self.token_ids)
        if not 0 <= self.committed <= len(self.token_ids):
            raise ValueError(f"committed={self.committed} outside 0..{len(self.token_ids)} tokens")

    @property
    def ahead(self) -> bool:
        """A guess drafted past the committed tokens, whose outcome depends on the pending verify."""
        return self.committed < len(self.token_ids)


@dataclass
class DraftProposal:
    tokens: list[int]
    # [len(tokens), V]: the distribution each token was drawn from; None when the drafter proposes
    # deterministically (acceptance then treats p_d as one-hot).
    probs: torch.Tensor | None = None
    # Per-token confidence c_k (probability the token survives given the previous ones did).
    confidence: list[float] | None = None

    def prefix(self, n: int) -> DraftProposal:
        """The first n drafts: what a verify budget of n keeps of this proposal."""
        return DraftProposal(
            self.tokens[:n],
            self.probs[:n] if self.probs is not None else None,
            self.confidence[:n] if self.confidence is not None else None,
        )


class Drafter(ABC):
    name: str
    # Target layers whose hidden states the drafter consumes; empty when it uses none.
    feature_layers: tuple[int, ...] = ()

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        """One proposal per request, each at most `request.max_tokens` long (may be empty)."""

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:  # noqa: B027 - optional hook
        """Target features [n, m*d] of committed positions start..start+n-1 (feature drafters)."""

    def release(self, seq_id: str) -> None:  # noqa: B027 - optional hook
        """The sequence finished: drop any per-sequence state."""
