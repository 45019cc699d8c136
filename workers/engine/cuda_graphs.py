"""Decode and verify steps through static, padded input buffers, replayed as CUDA graphs on a GPU.

A small model's forward at a small batch is shorter than the host's time to launch its hundreds of
kernels one by one; a captured graph launches the whole forward at once. Capture needs every tensor
at a fixed address and shape, so a step whose sequences each bring at most Q tokens and want logits
at all of them (decode: Q = 1, verify: Q = γ+1) is padded to a captured shape — B rows from a fixed
list of batch sizes, Q tokens per row — and its inputs are copied into that shape's buffers:
- a row's tokens past its own are padding: they sit after the row's real tokens (causal attention
  keeps them out of the real ones) and write their K/V to a scratch page no sequence owns;
- rows past the batch are padding sequences of Q tokens on that scratch page.
Each real token's result is then exactly what the unpadded forward computes wherever the kernels are
batch-invariant (the CPU's, `kernels/batch_invariance.py`). On the CPU the padded step runs eagerly,
which is how it is tested; on CUDA each shape is captured once, on first use, and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.kernels import AttentionMetadata, use_triton
from specray.workers.engine.kv_cache import PagedKVCache
from specray.workers.models.decoder import DecoderModel, ForwardOutput


@dataclass(frozen=True)
class StaticStepConfig:
    query_lens: tuple[int, ...]  # tokens per row of the padded shapes: 1 (decode) and γ+1 (verify)
    max_batch: int  # the largest padded batch; larger steps run unpadded
    capture: bool  # record a CUDA graph per shape (CUDA only); else run the padded step eagerly

    def __post_init__(self) -> None:
        if not self.query_lens or min(self.query_lens) < 1 or self.max_batch < 1:
            raise ValueError("padded steps need query lengths >= 1 and a max batch >= 1")


@dataclass(frozen=True)
class StepShape:
    batch: int
    query_len: int


def padded_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then each power of two and the midpoint above it (16, 24, 32, 48, ...), up to
    and including `max_batch`: a batch pads by at most a third past 8 rows."""
    sizes = {1, 2, 4, 8}
    power = 16
    while power < max_batch:
        sizes |= {power, power * 3 // 2}
        power *= 2
    return tuple(sorted(s for s in sizes if s < max_batch)) + (max_batch,)


class _Buffers:
    """The static inputs of every shape with Q tokens per row, sized for the largest batch; a shape
    of B rows uses their first B rows."""

    def __init__(
        self,
        max_batch: int,
        query_len: int,
        width: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        rows = max_batch * query_len
        self.query_len = query_len
        self.scratch_slot = scratch_block * block_size
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.arange(query_len, device=device).repeat(max_batch)
        self.slot_mapping = torch.full((rows,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((max_batch, width), scratch_block, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(0, rows + 1, query_len, dtype=torch.int32, device=device)
        self.seq_lens = torch.full((max_batch,), query_len, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(rows, device=device)

    def pad_rows(self, start: int, stop: int) -> None:
        """Rows start..stop-1 become padding sequences (no stale slot of a real one stays behind)."""
        q = self.query_len
        self.slot_mapping[start * q : stop * q] = self.scratch_slot
        self.positions[start * q : stop * q] = torch.arange(q, device=self.positions.device).repeat(
            stop - start
        )
        self.seq_lens[start:stop] = q

    def metadata(self, batch: int, block_size: int, seq_lens: list[int]) -> AttentionMetadata:
        q = self.query_len
        return AttentionMetadata(
            block_tables=self.block_tables[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            slot_mapping=self.slot_mapping[: batch * q],
            block_size=block_size,
            query_lens=[q] * batch,
            seq_lens_list=seq_lens,
            positions=self.positions[: batch * q],
        )


class StaticStepRunner:
    """Runs decode/verify steps padded to static shapes; see the module docstring."""

    def __init__(
        self, model: DecoderModel, kv: PagedKVCache, config: StaticStepConfig, feature_layers: tuple[int, ...]
    ) -> None:
        if kv.scratch_block is None:
            raise ValueError("padded steps need a KV cache with a scratch block")
        param = next(model.parameters())
        if config.capture and not (param.is_cuda and use_triton(param)):
            raise ValueError("CUDA graphs need the model on a CUDA device and the Triton attention kernel")
        self.model = model
        self.kv = kv
        self.config = config
        self.feature_layers = feature_layers
        self.batch_sizes = padded_batch_sizes(config.max_batch)
        self.query_lens = tuple(sorted(set(config.query_lens)))
        block_size = kv.block_size
        # Room for the longest sequence the cache or the model allows, plus a row's padding tokens.
        longest = min(kv.num_blocks * block_size, model.config.max_position_embeddings)
        self.width = -(-(longest + max(self.query_lens)) // block_size)
        self.buffers = {
            q: _Buffers(config.max_batch, q, self.width, kv.scratch_block, block_size, param.device)
            for q in self.query_lens
        }
        self._graphs: dict[StepShape, tuple[torch.cuda.CUDAGraph, ForwardOutput]] = {}
        self._pool = None

    def shape_for(self, query_lens: list[int], num_logits: list[int], starts: list[int]) -> StepShape | None:
        """The padded shape of a step, or None when the step does not fit one (a prefill chunk,
        rows without logits at every token, more rows than the largest shape)."""
        if query_lens != num_logits or len(query_lens) > self.config.max_batch:
            return None
        longest = max(query_lens)
        query_len = next((q for q in self.query_lens if q >= longest), None)
        if query_len is None or max(starts) + query_len > self.width * self.kv.block_size:
            return None
        batch = next(b for b in self.batch_sizes if b >= len(query_lens))
        return StepShape(batch, query_len)

    def run(
        self, token_ids: list[list[int]], starts: list[int], tables: torch.Tensor, shape: StepShape
    ) -> ForwardOutput:
        """The forward of one step padded to `shape`: logits [T, V] and features [T, m·d] of the
        step's T real tokens in order (as the unpadded forward returns them with logits at every token).

        `tables` [B, w] int32 on the host: the sequences' block tables, their KV reserved through
        `starts[b] + len(token_ids[b])`.
        """
        bufs = self.buffers[shape.query_len]
        q, rows = shape.query_len, len(token_ids)
        # Every index is worked out on the host (small tensors), then copied into the static buffers.
        lengths = torch.tensor([len(t) for t in token_ids])
        real = torch.arange(q).unsqueeze(0) < lengths.unsqueeze(1)  # [rows, Q]
        ids = torch.zeros(rows, q, dtype=torch.long)
        ids[real] = torch.tensor([t for tokens in token_ids for t in tokens])
        begin = torch.tensor(starts)
        positions = begin.unsqueeze(1) + torch.arange(q)
        pages = tables.long().gather(1, (positions // self.kv.block_size).clamp(max=tables.shape[1] - 1))
        slots = torch.where(
            real, pages * self.kv.block_size + positions % self.kv.block_size, bufs.scratch_slot
        )

        if self.config.capture:
            self._capture(shape)
        device = bufs.input_ids.device
        bufs.input_ids[: rows * q].copy_(ids.view(-1), non_blocking=True)
        bufs.positions[: rows * q].copy_(positions.view(-1), non_blocking=True)
        bufs.slot_mapping[: rows * q].copy_(slots.view(-1), non_blocking=True)
        bufs.seq_lens[:rows].copy_(begin + q, non_blocking=True)
        bufs.block_tables[:rows, : tables.shape[1]].copy_(tables, non_blocking=True)
        bufs.pad_rows(rows, shape.batch)
        if self.config.capture:
            graph, out = self._graphs[shape]
            graph.replay()
        else:
            seq_lens = (begin + q).tolist() + [q] * (shape.batch - rows)
            out = self._forward(bufs.metadata(shape.batch, self.kv.block_size, seq_lens), shape)
        keep = real.view(-1).nonzero().squeeze(1).to(device, non_blocking=True)
        return ForwardOutput(
            logits=out.logits[keep],
            features=out.features[keep] if out.features is not None else None,
            final_hidden=None,
        )

    def _forward(self, meta: AttentionMetadata, shape: StepShape) -> ForwardOutput:
        bufs = self.buffers[shape.query_len]
        tokens = shape.batch * shape.query_len
        return self.model(
            bufs.input_ids[:tokens],
            meta.positions,
            self.kv.layers,
            meta,
            bufs.logits_indices[:tokens],
            self.feature_layers,
        )

    def _capture(self, shape: StepShape) -> None:
        """Capture the shape's graph unless it exists: a warm-up forward (Triton compiles its
        kernels), then the recorded one. The buffers hold padding rows only meanwhile, so neither
        writes a real sequence's cache."""
        if shape in self._graphs:
            return
        bufs = self.buffers[shape.query_len]
        bufs.pad_rows(0, shape.batch)
        # The kernels size their grids from these host lists: the captured grid must cover any
        # sequence length a replay brings.
        meta = bufs.metadata(shape.batch, self.kv.block_size, [self.width * self.kv.block_size] * shape.batch)
        warmup = torch.cuda.Stream()
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup):
            self._forward(meta, shape)
        torch.cuda.current_stream().wait_stream(warmup)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(meta, shape)
        self._graphs[shape] = (graph, out)
