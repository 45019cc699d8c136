"""Per-sequence drafter state: the target features received so far and the drafter's context KV.

The engine reports features of newly committed positions after every step (`observe`); a start
before the cached length means the previous draft was partly rejected, so everything from there on
is cropped. Keys/values are projected lazily, only up to the position a proposal needs, and for all
sequences of a proposal in one projection call; the proposal reads them back padded into one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from specray.workers.drafters.layers import KV

# project(features [T, m·d], positions [T], owners [T]) -> per-layer KV [T, ...] of those positions,
# where owners[t] is the index, in the proposal's batch, of the sequence position t belongs to.
Projector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[KV]]


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

    def features_at(self, seq_ids: list[str], positions: list[int]) -> torch.Tensor:
        """[B, m·d]: each sequence's features at one position."""
        return torch.stack([self._states[s].features[p] for s, p in zip(seq_ids, positions)])

    def context_kv(self, seq_ids: list[str], lengths: list[int], project: Projector) -> list[KV]:
        """Per-layer context KV [B, max(lengths), ...] of positions 0..lengths[b]−1 of each sequence,
        zero-padded past its length; positions not cached yet are projected in one `project` call."""
        states = [self._states[s] for s in seq_ids]
        spans = []
        for row, (seq_id, state, length) in enumerate(zip(seq_ids, states, lengths)):
            if length > state.features.shape[0]:
                raise ValueError(f"{seq_id}: context of {length} needs features the drafter has not seen")
            if state.kv_len > length:
                state.kv = [(k[:length], v[:length]) for k, v in state.kv]
                state.kv_len = length
            if state.kv_len < length or not state.kv:
                spans.append((row, state.kv_len, length))
        if spans:
            device = states[0].features.device
            new = project(
                torch.cat([states[row].features[start:end] for row, start, end in spans]),
                torch.cat([torch.arange(start, end, device=device) for _, start, end in spans]),
                torch.cat([torch.full((end - start,), row, device=device) for row, start, end in spans]),
            )
            sizes = [end - start for _, start, end in spans]
            pieces = [(k.split(sizes), v.split(sizes)) for k, v in new]
            for i, (row, _, end) in enumerate(spans):
                state = states[row]
                mine = [(k[i], v[i]) for k, v in pieces]
                state.kv = (
                    [(torch.cat((k, nk)), torch.cat((v, nv))) for (k, v), (nk, nv) in zip(state.kv, mine)]
                    if state.kv
                    else mine
                )
                state.kv_len = end
        return [
            tuple(pad_sequence([s.kv[layer][part] for s in states], batch_first=True) for part in (0, 1))
            for layer in range(len(states[0].kv))
        ]

    def release(self, seq_id: str) -> None:
        self._states.pop(seq_id, None)
