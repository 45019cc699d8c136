"""The weights of the DeepSpec drafter loss; each trained drafter kind names its own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    l1: float = 0.9
    bce: float = 1.0
    decay: float = 4.0  # position weight exp(−k/decay)

    def __post_init__(self) -> None:
        if min(self.ce, self.l1, self.bce) < 0 or self.ce + self.l1 == 0 or self.decay <= 0:
            raise ValueError("loss weights must be >= 0 with ce or l1 > 0, and decay > 0")
