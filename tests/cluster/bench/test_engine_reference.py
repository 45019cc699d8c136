"""The engine reference of `specray bench serve`: a closed loop of c clients on one engine, timed as
the cluster's clients are, giving each prompt the output the engine gives it alone."""

from __future__ import annotations

import pytest

from specray.cluster.bench.engine_reference import closed_loop, reference_engine
from specray.cluster.runtime.config import ClusterConfig
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams

PROMPTS = [[1] + list(range(3 + n, 3 + 3 * n)) * 2 for n in (1, 4, 2, 7, 3)]


@pytest.mark.parametrize("scheduling", ["off", "fixed"])
def test_closed_loop_gives_each_prompt_its_own_output(tiny_target, scheduling):
    config = ClusterConfig(
        model="tiny",
        drafter="ngram",
        num_speculative_tokens=3,
        scheduling=scheduling,
        verifiers={"kv_cache_tokens": 1024},
    )
    engine = reference_engine(tiny_target, config, 2, None)
    assert engine.config.max_num_seqs == 2, "the engine's batch is the concurrency"
    assert (engine.drafter is None) == (scheduling == "off"), "autoregressive drafts nothing"
    timings, counters = closed_loop(engine, PROMPTS, 6)
    alone = LLMEngine(tiny_target, None, EngineConfig(num_speculative_tokens=0))
    expected = [alone.generate([p], SamplingParams(max_tokens=6))[0].output_ids for p in PROMPTS]
    assert [t.token_ids for t in timings] == expected, "outputs are not each prompt's own, in order"
    for t in timings:
        assert 0 < t.ttft <= t.latency, f"TTFT {t.ttft} not within the request's latency {t.latency}"
        # Every token after the first step's gets a latency; the first step brings at least one.
        assert 0 < len(t.token_ids) - len(t.itls) <= 4 and all(x >= 0 for x in t.itls)
    assert counters.accepted_drafts <= counters.verified_drafts
    if scheduling == "off":
        assert counters.verified_drafts == 0
    # Each request-step (a prefill or a decode step) commits its accepted drafts plus one token.
    request_steps = counters.steps + len(PROMPTS)
    assert request_steps + counters.accepted_drafts == sum(len(t.token_ids) for t in timings)
    assert request_steps / 2 <= counters.forwards < request_steps, "two requests per step, mostly"
