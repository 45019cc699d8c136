"""Per-sequence drafter state: the target features received so far and the drafter's context KV.

The engine reports features of newly committed positions after every step (`observe`); a start
before the cached length means the previous draft was partly rejected, so everything from there on
is cropped. Keys/values are projected lazily, only up to the position a proposal needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specray.workers.drafters.layers import KV

# project(features_of_new_positions, start) -> per-layer KV of those positions
Projector = Callable[[torch.Tensor, int], list[KV]]


@dataclass
class _State:
    features: torch.Tensor
    kv: list[KV] = field(default_factory=list)
    kv_len: int = 0


class ContextCache:
    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:
        state = self._states.get(seq_id)
        if state is None:
            if start != 0:
                raise ValueError(f"{seq_id}: first features must start at 0, got {start}")
            self._states[seq_id] = _State(features.detach().clone())
            return
        if start > state.features.shape[0]:
            raise ValueError(f"{seq_id}: features jump from {state.features.shape[0]} to {start}")
        state.features = torch.cat((state.features[:start], features.detach()))
        if state.kv_len > start:
            state.kv = [(k[:start], v[:start]) for k, v in state.kv]
            state.kv_len = start

    def num_features(self, seq_id: str) -> int:
        state = self._states.get(seq_id)
        return 0 if state is None else state.features.shape[0]

    def features(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        return self._states[seq_id].features[start:end]

    def context_kv(self, seq_id: str, length: int, project: Projector) -> list[KV]:
        """Per-layer context KV of positions 0..length-1, projecting the positions not cached yet."""
        state = self._states[seq_id]
        if length > state.features.shape[0]:
            raise ValueError(f"{seq_id}: context of {length} needs features the drafter has not seen")
        if state.kv_len > length:
            state.kv = [(k[:length], v[:length]) for k, v in state.kv]
            state.kv_len = length
        if state.kv_len < length or not state.kv:
            new = project(state.features[state.kv_len : length], state.kv_len)
            state.kv = (
                [(torch.cat((k, nk)), torch.cat((v, nv))) for (k, v), (nk, nv) in zip(state.kv, new)]
                if state.kv
                else new
            )
            state.kv_len = length
        return state.kv

    def release(self, seq_id: str) -> None:
        self._states.pop(seq_id, None)
