"""Runs the target model over a ragged batch and keeps its paged KV cache.

Each scheduled sequence brings its new tokens (a prefill chunk, one decode token, or an anchor plus
γ drafts) starting where its cached KV ends, and asks for logits at its last `num_logits` tokens.
Decode and verify steps may run padded to static shapes (`cuda_graphs.py`), CUDA graphs on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.kernels import build_attention_metadata
from specray.workers.engine.cuda_graphs import StaticStepConfig, StaticStepRunner
from specray.workers.engine.kv_cache import PagedKVCache
from specray.workers.models.decoder import DecoderModel, ForwardOutput


@dataclass
class ScheduledSequence:
    seq_id: str
    token_ids: list[int]
    num_logits: int

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"sequence {self.seq_id} scheduled with no tokens")
        if not 0 <= self.num_logits <= len(self.token_ids):
            raise ValueError(
                f"sequence {self.seq_id}: {self.num_logits} logits for {len(self.token_ids)} tokens"
            )


@dataclass
class RunOutput:
    logits: list[torch.Tensor]  # per sequence [num_logits, V] (fp32): views into `all_logits`
    all_logits: torch.Tensor  # [Σ num_logits, V] (fp32), the sequences' rows one after another
    features: list[torch.Tensor] | None  # per sequence [len(token_ids), m*d]
    final_hidden: list[torch.Tensor] | None  # per sequence [len(token_ids), d]


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        kv_cache_tokens: int = 16384,
        block_size: int = 16,
        feature_layers: tuple[int, ...] = (),
        static_steps: StaticStepConfig | None = None,
    ) -> None:
        self.model = model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv = PagedKVCache(
            self.config,
            -(-kv_cache_tokens // block_size),
            block_size,
            self.dtype,
            self.device,
            scratch_block=static_steps is not None,
        )
        self.feature_layers = tuple(sorted(feature_layers))
        # Decode and verify steps padded to static shapes (CUDA graphs on a GPU); others run as they come.
        self.static_steps = (
            StaticStepRunner(model, self.kv, static_steps, self.feature_layers) if static_steps else None
        )

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence], return_final_hidden: bool = False) -> RunOutput:
        seq_ids = [s.seq_id for s in batch]
        starts = [self.kv.length(s.seq_id) for s in batch]
        query_lens = [len(s.token_ids) for s in batch]
        num_logits = [s.num_logits for s in batch]
        seq_lens = [start + n for start, n in zip(starts, query_lens)]
        for seq, total in zip(batch, seq_lens):
            self.kv.reserve(seq.seq_id, total)
        shape = None
        if self.static_steps is not None and not return_final_hidden:
            shape = self.static_steps.shape_for(query_lens, num_logits, starts)
        if shape is not None:
            tables = self.kv.block_tables(seq_ids, torch.device("cpu"))
            out = self.static_steps.run([s.token_ids for s in batch], starts, tables, shape)
        else:
            out = self._forward(batch, query_lens, seq_lens, num_logits, return_final_hidden)
        for seq, total in zip(batch, seq_lens):
            self.kv.set_length(seq.seq_id, total)

        logits = out.logits.float()
        return RunOutput(
            logits=list(logits.split(num_logits)),
            all_logits=logits,
            features=list(out.features.split(query_lens)) if out.features is not None else None,
            final_hidden=list(out.final_hidden.split(query_lens)) if out.final_hidden is not None else None,
        )

    def _forward(
        self,
        batch: list[ScheduledSequence],
        query_lens: list[int],
        seq_lens: list[int],
        num_logits: list[int],
        return_final_hidden: bool,
    ) -> ForwardOutput:
        """The unpadded forward of any ragged batch."""
        meta = build_attention_metadata(
            self.kv.block_tables([s.seq_id for s in batch]), query_lens, seq_lens, self.kv.block_size
        )
        input_ids = torch.tensor(
            [t for s in batch for t in s.token_ids], dtype=torch.long, device=self.device
        )
        # The last num_logits tokens of each sequence.
        wanted = torch.tensor(num_logits, device=self.device)
        total = sum(num_logits)
        owner = torch.repeat_interleave(
            torch.arange(len(batch), device=self.device), wanted, output_size=total
        )
        first = meta.query_start_loc[1:].long() - wanted
        logits_rows = (
            first[owner] + torch.arange(total, device=self.device) - (wanted.cumsum(0) - wanted)[owner]
        )
        return self.model(
            input_ids,
            meta.positions,
            self.kv.layers,
            meta,
            logits_rows,
            self.feature_layers,
            return_final_hidden,
        )

    def rollback(self, seq_id: str, length: int) -> None:
        """Keep only the first `length` cached positions of the sequence (drop rejected drafts)."""
        self.kv.set_length(seq_id, length)

    def free(self, seq_id: str) -> None:
        self.kv.free(seq_id)
