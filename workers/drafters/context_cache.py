"""Per-sequence drafter state: the target features received so far and the drafter's context KV.

The engine reports features of newly committed positions after every step (`observe`); a start
before the cached length means the previous draft was partly rejected, so everything from there on
is cropped. Keys/values are projected lazily, only up to the position a proposal needs, and for all
sequences of a proposal in one projection call; the proposal reads them back padded into one batch
(a batch of one reads a view: no copy).

Features and KV live in buffers that double when full, so a step appends its few positions in
place: concatenating onto the whole history each step would copy O(context) bytes per step.
Beside the KV, a projector may hand back one state row per position that proposals read again
(DSpark's fused H_ctx at anchor−1), so it is not computed twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from specray.workers.drafters.layers import KV


@dataclass
class Projection:
    """What a projector derives from the features of T positions."""

    kv: list[KV]  # per layer, [T, ...] each
    states: torch.Tensor | None = None  # [T, d]: a row per position that proposals read again


# project(features [T, m·d], positions [T], owners [T]) -> the Projection of those positions, where
# owners[t] is the index, in the proposal's batch, of the sequence position t belongs to.
Projector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Projection]

_MIN_CAPACITY = 256


def _grown(buffer: torch.Tensor, used: int, needed: int) -> torch.Tensor:
    """`buffer` if it holds `needed` rows, else a buffer of twice that capacity holding its first `used`."""
    if needed <= buffer.shape[0]:
        return buffer
    bigger = buffer.new_empty(max(2 * needed, _MIN_CAPACITY), *buffer.shape[1:])
    bigger[:used] = buffer[:used]
    return bigger


@dataclass
class _State:
    buffer: torch.Tensor  # [capacity, m·d], the first `length` rows received
    length: int
    kv: list[KV] = field(default_factory=list)  # per layer, [capacity, ...] buffers
    states: torch.Tensor | None = None  # [capacity, d], rows of the projector's states
    kv_len: int = 0

    @property
    def features(self) -> torch.Tensor:
        return self.buffer[: self.length]

    def write(self, start: int, features: torch.Tensor) -> None:
        end = start + features.shape[0]
        self.buffer = _grown(self.buffer, start, end)
        self.buffer[start:end] = features
        self.length = end
        self.kv_len = min(self.kv_len, start)

    def write_kv(self, start: int, new: list[KV], states: torch.Tensor | None) -> None:
        end = start + new[0][0].shape[0]
        capacity = self.buffer.shape[0]
        if not self.kv:
            self.kv = [
                (k.new_empty(capacity, *k.shape[1:]), v.new_empty(capacity, *v.shape[1:])) for k, v in new
            ]
        grown = []
        for (k_buf, v_buf), (k, v) in zip(self.kv, new):
            k_buf, v_buf = _grown(k_buf, start, end), _grown(v_buf, start, end)
            k_buf[start:end], v_buf[start:end] = k, v
            grown.append((k_buf, v_buf))
        if states is not None:
            if self.states is None:
                self.states = states.new_empty(capacity, *states.shape[1:])
            self.states = _grown(self.states, start, end)
            self.states[start:end] = states
        self.kv, self.kv_len = grown, end


class ContextCache:
    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:
        state = self._states.get(seq_id)
        if state is None:
            if start != 0:
                raise ValueError(f"{seq_id}: first features must start at 0, got {start}")
            state = self._states[seq_id] = _State(features.new_empty(0, *features.shape[1:]), 0)
        if start > state.length:
            raise ValueError(f"{seq_id}: features jump from {state.length} to {start}")
        state.write(start, features.detach())

    def num_features(self, seq_id: str) -> int:
        state = self._states.get(seq_id)
        return 0 if state is None else state.length

    def features_at(self, seq_ids: list[str], positions: list[int]) -> torch.Tensor:
        """[B, m·d]: each sequence's features at one position."""
        return torch.stack([self._states[s].features[p] for s, p in zip(seq_ids, positions)])

    def states_at(self, seq_ids: list[str], positions: list[int]) -> torch.Tensor:
        """[B, d]: each sequence's projected state row at one position (projected by `context_kv`)."""
        rows = []
        for seq_id, position in zip(seq_ids, positions):
            state = self._states[seq_id]
            if state.states is None or position >= state.kv_len:
                raise ValueError(f"{seq_id}: no projected state at position {position}")
            rows.append(state.states[position])
        return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)

    def context_kv(self, seq_ids: list[str], lengths: list[int], project: Projector) -> list[KV]:
        """Per-layer context KV [B, max(lengths), ...] of positions 0..lengths[b]−1 of each sequence,
        zero-padded past its length; positions not cached yet are projected in one `project` call."""
        states = [self._states[s] for s in seq_ids]
        spans = []
        for row, (seq_id, state, length) in enumerate(zip(seq_ids, states, lengths)):
            if length > state.length:
                raise ValueError(f"{seq_id}: context of {length} needs features the drafter has not seen")
            state.kv_len = min(state.kv_len, length)
            if state.kv_len < length or not state.kv:
                spans.append((row, state.kv_len, length))
        if spans:
            device = states[0].buffer.device
            new = project(
                torch.cat([states[row].features[start:end] for row, start, end in spans]),
                torch.cat([torch.arange(start, end, device=device) for _, start, end in spans]),
                torch.cat([torch.full((end - start,), row, device=device) for row, start, end in spans]),
            )
            sizes = [end - start for _, start, end in spans]
            pieces = [(k.split(sizes), v.split(sizes)) for k, v in new.kv]
            rows = None if new.states is None else new.states.split(sizes)
            for i, (row, start, _) in enumerate(spans):
                states[row].write_kv(
                    start, [(k[i], v[i]) for k, v in pieces], None if rows is None else rows[i]
                )
        if len(states) == 1:
            return [(k[: lengths[0]].unsqueeze(0), v[: lengths[0]].unsqueeze(0)) for k, v in states[0].kv]
        return [
            tuple(
                pad_sequence(
                    [s.kv[layer][part][:length] for s, length in zip(states, lengths)], batch_first=True
                )
                for part in (0, 1)
            )
            for layer in range(len(states[0].kv))
        ]

    def release(self, seq_id: str) -> None:
        self._states.pop(seq_id, None)
