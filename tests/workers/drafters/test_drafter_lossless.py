"""Every drafter through the engine: greedy output equals autoregressive output, sampling runs."""

from __future__ import annotations

import pytest
import torch

from specray.workers.drafters.checkpoint import build_model, load_drafter, save_drafter_model
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.dspark import DSparkDrafter
from specray.workers.drafters.eagle3 import Eagle3Drafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams

KINDS = {
    "dspark": {"markov_rank": 8, "confidence": True},
    "dspark-state-input": {"markov_rank": 8, "confidence": True, "state_input": True},
    "dspark-tied": {"markov_rank": 8, "confidence": True, "state_input": True, "markov_tied": True},
    "dspark-candidates": {"markov_rank": 8, "confidence": True, "state_input": True, "markov_candidates": 5},
    "dflash": {},
    "eagle3": {},
}


def _drafter(kind: str, target):  # noqa: ANN001, ANN202
    torch.manual_seed(1)
    config = DrafterConfig.for_target(kind.split("-")[0], target.config, 3, mask_token_id=2, **KINDS[kind])
    model = build_model(config)
    return (Eagle3Drafter if kind == "eagle3" else DSparkDrafter)(model, target.model)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_greedy_matches_autoregressive(kind, tiny_target) -> None:  # noqa: ANN001
    prompts = [[5, 9, 17, 33, 2, 40], [7, 7, 8, 60, 61, 3, 12, 90, 4]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = LLMEngine(tiny_target, None, EngineConfig(num_speculative_tokens=0)).generate(prompts, params)
    spec = LLMEngine(
        tiny_target, _drafter(kind, tiny_target), EngineConfig(num_speculative_tokens=7)
    ).generate(prompts, params)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert all(s.stats.draft_tokens > 0 for s in spec)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sampled_drafts_carry_exact_probabilities(kind, tiny_target) -> None:  # noqa: ANN001
    drafter = _drafter(kind, tiny_target)
    engine = LLMEngine(tiny_target, drafter, EngineConfig(num_speculative_tokens=5))
    seqs = engine.generate(
        [[5, 9, 17, 33]], SamplingParams(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True)
    )
    assert len(seqs[0].output_ids) == 16 and seqs[0].stats.draft_tokens > 0


@pytest.mark.parametrize("kind", ["dspark-tied", "eagle3"])
def test_a_checkpoint_drafts_for_a_bf16_target(kind, tiny_target, tmp_path) -> None:  # noqa: ANN001
    """The engine's default dtype on bf16-native CPUs is bf16: a trained drafter loaded for that target
    reads its embedding, LM head and features and still drafts, losslessly."""
    import copy

    save_drafter_model(_drafter(kind, tiny_target).model, tmp_path / kind)
    target = copy.copy(tiny_target)
    target.model = copy.deepcopy(tiny_target.model).to(torch.bfloat16)
    prompts = [[5, 9, 17, 33, 2, 40]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    plain = LLMEngine(target, None, EngineConfig(num_speculative_tokens=0)).generate(prompts, params)
    drafter = load_drafter(tmp_path / kind, target)
    spec = LLMEngine(target, drafter, EngineConfig(num_speculative_tokens=5)).generate(prompts, params)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert all(s.stats.draft_tokens > 0 for s in spec)
