"""`specray bench drafting`'s bookkeeping on a tiny target: it times every drafter against the same
decode step, leaves the target's KV as it found it, and plots the ratios (no timing is asserted)."""

from __future__ import annotations

import argparse

import pytest
import torch

from specray.cluster.bench import drafting_bench
from specray.workers.drafters.checkpoint import build_model
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.dspark import DSparkDrafter
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence


def test_measure_times_each_drafter_against_one_decode_step(tiny_target, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    config = DrafterConfig.for_target(
        "dspark", tiny_target.config, 3, mask_token_id=2, markov_rank=4, confidence=True
    )
    dspark = DSparkDrafter(build_model(config), tiny_target.model)
    layers = dspark.feature_layers + (4,)  # the prefill captured one layer more than the drafter reads
    prompts = [[5, 9, 17, 33, 2, 40], [7, 7, 8, 60, 61, 3, 12]]
    prefill = ModelRunner(tiny_target.model, 256, 4, layers).run(
        [ScheduledSequence(f"p{i}", p, 1) for i, p in enumerate(prompts)]
    )
    args = argparse.Namespace(num_speculative_tokens=5, repetitions=2, clock="wall")
    drafters = {"dspark": dspark, "ngram": NgramDrafter()}
    rows = drafting_bench._measure(
        tiny_target, drafters, layers, prompts, [3, 4], prefill.features, 1.0, args
    )
    assert [r["drafter"] for r in rows] == ["dspark", "ngram"]
    assert all(r["batch"] == 2 and r["step_ms"] > 0 and r["propose_ms"] > 0 for r in rows)
    assert rows[0]["propose_per_step"] == pytest.approx(rows[0]["propose_ms"] / rows[0]["step_ms"])
    # The drafter still holds each prompt's features once, not the re-delivered tail twice.
    assert [dspark.cache.num_features(f"s{i}") for i in range(2)] == [len(p) for p in prompts]
    path = tmp_path / "drafting.png"
    drafting_bench._plot([{"dtype": "float32", **r} for r in rows], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
