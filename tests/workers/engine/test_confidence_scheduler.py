"""DSpark Algorithm 1 on hand-made survival tables and step curves, and the profiled step curve."""

from __future__ import annotations

import pytest
import torch

from specray.workers.engine.confidence_scheduler import confidence_budget
from specray.workers.engine.scheduling_policy import ConfidenceScheduling, FixedScheduling
from specray.workers.engine.step_curve import (
    StepCurve,
    default_batch_sizes,
    load_or_profile,
    profile_step_curve,
)


def curve(*sps: float) -> StepCurve:
    """SPS at B = 1, 2, 3, ..."""
    return StepCurve(tuple(range(1, len(sps) + 1)), sps)


def test_admits_in_survival_order_across_requests() -> None:
    # Survivals: r0 = (0.9, 0.45), r1 = (0.6, 0.54). With SPS falling 5% per token, a candidate pays
    # off while its survival beats the ~5% relative slow-down of the whole batch.
    sps = [1.0 - 0.05 * b for b in range(0, 8)]
    lengths = confidence_budget([[0.9, 0.5], [0.6, 0.9]], StepCurve(tuple(range(2, 10)), tuple(sps)))
    # Θ: B=2 → 2·1.0=2.0; +0.9 → 2.9·0.95=2.755; +0.6 → 3.5·0.9=3.15; +0.54 → 4.04·0.85=3.434;
    # +0.45 → 4.49·0.8=3.592: all rise, so everything is admitted.
    assert lengths == [2, 2]
    # A steeper curve (12% per token) stops after 0.9 and 0.6: +0.54 gives 4.04·0.64 = 2.59, below
    # 3.5·0.76 = 2.66.
    steep = StepCurve(tuple(range(2, 10)), tuple(1.0 - 0.12 * b for b in range(0, 8)))
    assert confidence_budget([[0.9, 0.5], [0.6, 0.9]], steep) == [1, 1]


def test_early_stop_even_when_a_later_candidate_would_raise_throughput() -> None:
    # R = 1, a_1 = 0.8 and a_2 = 0.8 (c_2 = 1): Θ = 1.0 at B=1, 0.9 at B=2 (no gain) and
    # 2.6·0.45 = 1.17 at B=3 (a gain a search that looked ahead would take).
    step = curve(1.0, 0.5, 0.45)
    assert (1 + 0.8 + 0.8) * step.sps(3) > 1.0 * step.sps(1)
    assert confidence_budget([[0.8, 1.0]], step) == [0]


def test_paper_counterexample_admits_nothing() -> None:
    # DSpark Appendix A: SPS = {1.0, 0.5, 0.45}, a_1 = 0.8. Admitting x_1 gives 1.8·0.5 = 0.9 < 1.0,
    # so the lossless search verifies the anchor only, whatever x_1 is and however sure c_2 is.
    for c2 in (0.0, 0.5, 1.0):
        assert confidence_budget([[0.8, c2]], curve(1.0, 0.5, 0.45)) == [0]


def test_prefix_property_on_ties_and_rising_confidences() -> None:
    flat = curve(*[1.0] * 20)
    # Equal survivals everywhere (c = 1): ties go by j, and every request keeps a prefix.
    assert confidence_budget([[1.0, 1.0, 1.0], [1.0, 1.0]], flat) == [3, 2]
    # Each admitted set is a prefix: lengths count leading drafts, so check against survivals.
    table = [[0.9, 0.99, 0.2, 0.99], [0.5, 1.0, 1.0], [0.95]]
    gently = StepCurve((1, 30), (1.0, 0.4))
    lengths = confidence_budget(table, gently)
    for cs, length in zip(table, lengths):
        assert 0 <= length <= len(cs)
    assert lengths[0] >= 2 and lengths[2] == 1


def test_budget_shrinks_to_anchors_when_steps_slow_down_steeply() -> None:
    # Step time linear in tokens (SPS = 1/B, saturated): (R + a)/(R + 1) < 1 for any uncertain draft.
    saturated = StepCurve(tuple(range(1, 65)), tuple(1 / b for b in range(1, 65)))
    assert confidence_budget([[0.9] * 7] * 8, saturated) == [0] * 8
    assert confidence_budget([[0.99] * 7] * 1, saturated) == [0]
    # Between flat and saturated the budget lands in the middle.
    assert 0 < sum(confidence_budget([[0.9] * 7] * 8, StepCurve((8, 64), (1.0, 0.5)))) < 56


def test_budget_grows_to_gamma_when_steps_are_free() -> None:
    assert confidence_budget([[0.3] * 7] * 4, StepCurve((1, 64), (5.0, 5.0))) == [7] * 4
    # A zero-survival draft adds nothing, so the search stops there even on a flat curve.
    assert confidence_budget([[0.9, 0.0, 0.9]], StepCurve((1, 64), (5.0, 5.0))) == [1]


def test_scheduler_policies_and_prior() -> None:
    flat = StepCurve((1, 64), (5.0, 5.0))
    assert FixedScheduling().budgets([3, 0, 5], [None, None, [0.1] * 5]) == [3, 0, 5]
    scheduler = ConfidenceScheduling(flat, prior=0.5)
    assert scheduler.budgets([3, 2], [None, [0.9, 0.9]]) == [3, 2]
    assert ConfidenceScheduling(curve(1.0, 0.5, 0.45), prior=0.8).budgets([2], [None]) == [0]
    with pytest.raises(ValueError):
        ConfidenceScheduling()
    with pytest.raises(ValueError):
        FixedScheduling(prior=1.5)
    with pytest.raises(ValueError):
        scheduler.budgets([2], [[0.5]])
    with pytest.raises(ValueError):
        confidence_budget([[1.2]], flat)


def test_step_curve_interpolates_and_validates() -> None:
    step = StepCurve((1, 3, 5), (10.0, 6.0, 5.0))
    assert step.sps(1) == 10.0 and step.sps(0.5) == 10.0
    assert step.sps(2) == pytest.approx(8.0)
    assert step.sps(10) == pytest.approx(2.5)  # past the table: constant tokens/s
    for bad in [((1, 1), (1.0, 1.0)), ((0,), (1.0,)), ((1, 2), (1.0,)), ((1,), (0.0,))]:
        with pytest.raises(ValueError):
            StepCurve(*bad)
    assert default_batch_sizes(1) == [1]
    assert default_batch_sizes(24) == [1, 2, 4, 8, 16, 24]


def test_profile_tiny_model_and_cache(tiny_target, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPECRAY_CACHE_DIR", str(tmp_path))
    model = tiny_target.model
    step = profile_step_curve(model, max_tokens_per_batch=16, repeats=1)
    assert step.batch_tokens == (1, 2, 4, 8, 16)
    assert all(a >= b for a, b in zip(step.steps_per_s, step.steps_per_s[1:]))
    cached = load_or_profile(model, "tiny/model", max_tokens_per_batch=8)
    files = list((tmp_path / "step_curves").glob("*.json"))
    assert [f.name for f in files] == [f"tiny_model-float32-cpu-t{torch.get_num_threads()}.json"]
    assert load_or_profile(model, "tiny/model", max_tokens_per_batch=8) == cached  # from the cache
    assert load_or_profile(model, "tiny/model", max_tokens_per_batch=16).batch_tokens[-1] == 16


def test_profile_command_prints_and_plots(tmp_path, monkeypatch, capsys) -> None:
    from tiny_models import tiny_hf_model

    from specray.cluster.commands.cli import main

    monkeypatch.setenv("SPECRAY_CACHE_DIR", str(tmp_path / "cache"))
    tiny_hf_model("llama", tmp_path / "tiny", vocab_size=64)
    png = tmp_path / "curve.png"
    argv = ["profile", "--model", str(tmp_path / "tiny"), "--max-tokens-per-batch", "8", "--png", str(png)]
    assert main(argv) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == [1, 2, 4, 8]
    assert png.stat().st_size > 0
    assert len(list((tmp_path / "cache" / "step_curves").glob("*-float32-cpu-t1.json"))) == 1


def test_engine_greedy_with_confidence_scheduling_equals_autoregressive(tmp_path) -> None:
    from tiny_models import tiny_hf_model

    from specray.workers.drafters.ngram import NgramDrafter
    from specray.workers.engine.config import EngineConfig
    from specray.workers.engine.llm_engine import LLMEngine
    from specray.workers.engine.sampling import SamplingParams
    from specray.workers.models.loader import load_model

    tiny_hf_model("qwen3", tmp_path, vocab_size=64)
    target = load_model(str(tmp_path), "float32")
    prompts = [[1, 7, 8, 9, 7, 8, 9, 7, 8], [3, 4, 5, 3, 4, 5, 3], [10, 11, 12, 13, 10, 11]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    reference = LLMEngine(target, None, EngineConfig(num_speculative_tokens=0)).generate(prompts, params)
    # A curve steep enough that the n-gram prior (0.7) admits some drafts but not all of them.
    curve = StepCurve((1, 4, 32), (1.0, 0.9, 0.1))
    config = EngineConfig(
        num_speculative_tokens=4, scheduling="confidence", step_curve=curve, confidence_prior=0.7
    )
    engine = LLMEngine(target, NgramDrafter(), config)
    seqs = engine.generate(prompts, params)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in reference]
    fixed = LLMEngine(target, NgramDrafter(), EngineConfig(num_speculative_tokens=4)).generate(
        prompts, params
    )
    verified = sum(s.stats.draft_tokens for s in seqs)
    assert 0 < verified < sum(s.stats.draft_tokens for s in fixed)
