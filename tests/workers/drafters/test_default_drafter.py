"""The committed default DSpark drafter on the real SmolLM2: it loads, drafts, and stays lossless."""

from __future__ import annotations

import pytest

from specray.workers.drafters.checkpoint import BUNDLED_DRAFTERS, load_drafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.loader import load_model

pytestmark = pytest.mark.slow


def test_default_drafter_is_lossless_on_smollm2() -> None:
    target = load_model("smollm2-135m", "float32")
    drafter = load_drafter("smollm2-135m-dspark", target)
    assert drafter.name == "dspark" and BUNDLED_DRAFTERS["smollm2-135m-dspark"].is_dir()
    plain = LLMEngine(target, None, EngineConfig(num_speculative_tokens=0))
    prompts = [
        plain.encode_prompt(messages=[{"role": "user", "content": text}])
        for text in ("What is the capital of France?", "Write a Python function that adds two numbers.")
    ]
    params = SamplingParams(max_tokens=16)
    reference = plain.generate(prompts, params)
    spec = LLMEngine(target, drafter, EngineConfig(num_speculative_tokens=7)).generate(prompts, params)
    assert [s.output_ids for s in spec] == [s.output_ids for s in reference]
    assert sum(s.stats.accepted_tokens for s in spec) > 0
