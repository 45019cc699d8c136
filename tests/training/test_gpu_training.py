"""The training pipeline and the speculative engine on a CUDA device (bf16 target, Triton kernels).

Skipped without a GPU; run with `pytest -m gpu` on a machine that has one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from specray.training.fit import FitConfig, fit
from specray.training.regenerate import write_shard
from specray.training.target_cache import CacheConfig, TargetCache, build_cache
from specray.workers.drafters.checkpoint import load_drafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.loader import LoadedModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _on_cuda(target: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    moved = copy.copy(target)
    moved.model = copy.deepcopy(target.model).to(device="cuda", dtype=dtype)
    return moved


def test_cache_fit_and_lossless_drafting_on_cuda(tiny_target, tmp_path) -> None:  # noqa: ANN001
    target = _on_cuda(tiny_target, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (8,), generator=gen).tolist() for _ in range(24)]
    engine = LLMEngine(target, None, EngineConfig(num_speculative_tokens=0, kv_cache_tokens=8192))
    seqs = engine.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", range(0, 20)), ("valid", range(20, 24))):
        records = [
            {"id": str(i), "mode": "greedy", "prompt_ids": prompts[i], "output_ids": seqs[i].output_ids}
            for i in rows
        ]
        write_shard(data, split, 0, records)
    build_cache(
        CacheConfig(data_dir=data, out_dir=tmp_path / "cache", num_features=3, shard_records=8),
        target,
        progress=False,
    )
    assert len(TargetCache(tmp_path / "cache", "train")) == 20

    config = FitConfig(
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "dspark",
        markov_rank=8,
        epochs=6,
        lr=3e-3,
        warmup=0.1,
        sequences_per_step=4,
        anchors_per_sequence=8,
        device="cuda",
    )
    # From the cache, and with the target's features computed online from the data (no cache).
    online = replace(config, cache_dir=data, num_features=3, out_dir=tmp_path / "dspark-online")
    for run in (config, online):
        fit(run, target, progress=False)
        history = json.loads((run.out_dir / "train_log.json").read_text())["history"]
        first, last = sum(h["ce"] for h in history[:4]) / 4, sum(h["ce"] for h in history[-4:]) / 4
        assert last < first * 0.9, (
            f"CUDA training ({run.cache_dir.name}) did not reduce the loss: {first:.3f} -> {last:.3f}"
        )

    fp32 = _on_cuda(tiny_target, torch.float32)
    drafter = load_drafter(tmp_path / "dspark", fp32)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = LLMEngine(fp32, None, EngineConfig(num_speculative_tokens=0)).generate(prompts[:6], params)
    spec = LLMEngine(fp32, drafter, EngineConfig(num_speculative_tokens=7)).generate(prompts[:6], params)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain], "speculative output differs on CUDA"
