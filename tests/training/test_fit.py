"""Cache → fit on a tiny random target: the loss falls, checkpoints round-trip, greedy stays lossless;
features computed online are the cache's."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from specray.training.acceptance_estimate import score_drafters
from specray.training.fit import FitConfig, batch_loss, drafter_config, fit
from specray.training.objective import block_labels, choose_anchors, teacher_forced_blocks
from specray.training.online_features import OnlineTargetFeatures, open_features
from specray.training.regenerate import write_shard
from specray.training.target_cache import CacheConfig, CachedSample, TargetCache, build_cache
from specray.workers.drafters.checkpoint import (
    build_model,
    load_drafter,
    load_drafter_model,
    save_drafter_model,
)
from specray.workers.drafters.config import DrafterConfig
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams


def write_tiny_responses(target, data_dir: Path, n: int, seed: int) -> None:  # noqa: ANN001
    """Target-regenerated responses, as `specray train data` writes them (greedy, tiny target)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 96, (8,), generator=gen).tolist() for _ in range(n)]
    engine = LLMEngine(target, None, EngineConfig(num_speculative_tokens=0, kv_cache_tokens=4096))
    seqs = engine.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    data_dir.mkdir(parents=True, exist_ok=True)
    records = [
        {"id": str(i), "mode": "greedy", "prompt_ids": p, "output_ids": s.output_ids}
        for i, (p, s) in enumerate(zip(prompts, seqs))
    ]
    write_shard(data_dir, "train" if seed == 0 else "valid", 0, records)


@pytest.fixture(scope="module")
def tiny_cache(tiny_target, tmp_path_factory) -> Path:  # noqa: ANN001
    root = tmp_path_factory.mktemp("train")
    write_tiny_responses(tiny_target, root / "data", 12, seed=0)
    write_tiny_responses(tiny_target, root / "data", 4, seed=1)
    config = CacheConfig(data_dir=root / "data", out_dir=root / "cache", num_features=3, shard_records=5)
    build_cache(config, tiny_target, progress=False)
    return root / "cache"


def test_cache_holds_features_and_masks(tiny_cache, tiny_target) -> None:  # noqa: ANN001
    data = TargetCache(tiny_cache, "train")
    assert len(data) == 12 and len(TargetCache(tiny_cache, "valid")) == 4
    sample = data[0]
    assert sample.features.shape == (48, 3 * 32) and sample.final_hidden.shape == (48, 32)
    assert sample.loss_mask[:8].sum() == 0 and sample.loss_mask[8:].all()


def test_online_features_are_the_cached_ones(tiny_cache, tiny_target) -> None:  # noqa: ANN001
    cached = TargetCache(tiny_cache, "train")
    online = open_features(tiny_cache.parent / "data", "train", tiny_target, cached.feature_layers)
    assert isinstance(online, OnlineTargetFeatures) and len(online) == len(cached)
    # One batched forward for several records, as a training step asks for them.
    for i, b in zip([3, 0, 7], online.samples([3, 0, 7])):
        c = cached[i]
        assert torch.equal(c.ids, b.ids) and torch.equal(c.loss_mask, b.loss_mask), f"record {i} differs"
        assert torch.allclose(c.features, b.features, atol=1e-2, rtol=1e-2), f"record {i}: features differ"
        assert torch.allclose(c.final_hidden, b.final_hidden, atol=1e-2, rtol=1e-2), f"record {i}: final"


def test_token_samples_are_the_samples_ids_and_masks(tiny_cache, tiny_target) -> None:  # noqa: ANN001
    """Both sources list every sample's ids and loss mask without computing or reading features
    (what the draft vocabulary counts), equal to the full samples'."""
    cached = TargetCache(tiny_cache, "train")
    online = open_features(tiny_cache.parent / "data", "train", tiny_target, cached.feature_layers)
    for source in (cached, online):
        pairs = list(source.token_samples())
        assert len(pairs) == len(source), f"{type(source).__name__}: not one pair per sample"
        for i in (0, 5):
            ids, mask = pairs[i]
            assert torch.equal(ids, cached[i].ids) and torch.equal(mask, cached[i].loss_mask), (
                f"{type(source).__name__}: sample {i}'s ids or mask differ"
            )


def _short_fit(
    kind: str,
    recipe: bool,
    cache: Path,
    out: Path,
    num_layers: int = 1,
    autocast: bool | None = None,
    feature_dtype: str = "float32",
) -> FitConfig:
    """A few epochs on the tiny cache, enough for the loss to fall; `recipe` adds `make drafter`'s
    switches (state input, embedding-tied Markov head)."""
    return FitConfig(
        kind=kind,
        num_layers=num_layers,
        autocast=autocast,
        state_input=recipe,
        markov_tied=recipe,
        cache_dir=cache,
        num_features=3,  # the tiny cache's (online features only; a cache fixes its own)
        feature_dtype=feature_dtype,
        out_dir=out,
        markov_rank=8,
        epochs=6,
        lr=3e-3,
        warmup=0.1,
        sequences_per_step=3,
        anchors_per_sequence=8,
    )


@pytest.mark.parametrize(
    "kind",
    ["dspark", "dspark-recipe", "dspark-recipe-2layers", "dspark-recipe-online-bf16", "dflash", "eagle3"],
)
def test_fit_reduces_loss_and_round_trips(kind, tiny_cache, tiny_target, tmp_path) -> None:  # noqa: ANN001
    """Each kind trains and loads into the engine, which drafts losslessly with it; the recipe also
    with 2 backbone layers, and with online features computed in bf16 under CPU bf16 autocast."""
    source = tiny_cache.parent / "data" if "online" in kind else tiny_cache
    config = _short_fit(
        kind.split("-")[0],
        "recipe" in kind,
        source,
        tmp_path / kind,
        num_layers=2 if "2layers" in kind else 1,
        autocast=True if "bf16" in kind else None,
        feature_dtype="bfloat16" if "bf16" in kind else "float32",
    )
    summary = fit(config, tiny_target, progress=False)
    history = json.loads((tmp_path / kind / "train_log.json").read_text())["history"]
    first = sum(h["ce"] for h in history[:4]) / 4
    last = sum(h["ce"] for h in history[-4:]) / 4
    assert last < first * 0.9, summary

    model = load_drafter_model(tmp_path / kind)
    trained = torch.load(tmp_path / kind / "training_state.pt", weights_only=False)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name].to(torch.bfloat16).float()), f"{name} not saved as bf16"
    assert not any(k.startswith(("model.embed_tokens", "lm_head")) for k in trained)

    drafter = load_drafter(tmp_path / kind, tiny_target)
    assert model.config.num_layers == config.num_layers, "the checkpoint lost the layer count"
    prompts = [[5, 9, 17, 33, 2, 40], [7, 7, 8, 60, 61, 3, 12]]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = LLMEngine(tiny_target, None, EngineConfig(num_speculative_tokens=0)).generate(prompts, params)
    spec = LLMEngine(tiny_target, drafter, EngineConfig(num_speculative_tokens=7)).generate(prompts, params)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert all(s.stats.draft_tokens > 0 for s in spec)


def _24_planned_steps(tiny_cache, out_dir, **limit) -> FitConfig:  # noqa: ANN001, ANN003
    """12 sequences, 3 per step, 6 epochs: a 24-step plan, cut by `limit`."""
    return FitConfig(
        kind="dflash",
        cache_dir=tiny_cache,
        out_dir=out_dir,
        epochs=6,
        sequences_per_step=3,
        anchors_per_sequence=4,
        **limit,
    )


def test_time_budget_shortens_the_schedule(tiny_cache, tiny_target, tmp_path) -> None:  # noqa: ANN001
    config = _24_planned_steps(tiny_cache, tmp_path / "budget", time_budget_s=1e-3)
    summary = fit(config, tiny_target, progress=False)
    # 12 sequences, 3 per step, 6 epochs plan 24 steps; a spent budget stops after the 10 timed ones.
    assert summary["steps"] == 10, f"the budget did not cut the 24 planned steps: {summary['steps']}"
    assert (tmp_path / "budget" / "model.safetensors").exists(), "no checkpoint written at the cut"


def test_max_steps_ends_the_schedule_early(tiny_cache, tiny_target, tmp_path) -> None:  # noqa: ANN001
    config = _24_planned_steps(tiny_cache, tmp_path / "capped", max_steps=5)
    summary = fit(config, tiny_target, progress=False)
    # 12 sequences, 3 per step, 6 epochs plan 24 steps; the cap ends the schedule (LR and all) at 5.
    assert summary["steps"] == 5, f"max_steps=5 did not end the 24-step schedule: {summary['steps']}"
    assert summary["final"]["step"] == 5, "the last logged step is not the capped one"


def test_score_ranks_a_trained_drafter_above_its_untrained_start(tiny_cache, tiny_target, tmp_path) -> None:  # noqa: ANN001
    config = _short_fit("dspark", True, tiny_cache, tmp_path / "trained")
    fit(config, tiny_target, progress=False)
    torch.manual_seed(0)
    save_drafter_model(
        build_model(DrafterConfig.load(tmp_path / "trained" / "config.json")), tmp_path / "untrained"
    )
    # Scored on its training split: a tiny random target's text is learnt, not generalised from.
    reports = score_drafters(
        [tmp_path / "untrained", tmp_path / "trained"], tiny_target, "tiny", tiny_cache, split="train"
    )
    assert [r["temperature"] for r in reports] == [0.0, 1.0]
    # Each of the 40 response tokens of the 12 sequences is the first label of one anchor.
    assert all(r["anchors"] == 12 * 40 for report in reports for r in report["results"])
    for report in reports:
        untrained, trained = report["results"]
        for r in (untrained, trained):
            by_position = r["accept_by_position"]
            assert all(a >= b for a, b in zip(by_position, by_position[1:])), (
                f"not a prefix rate: {by_position}"
            )
            assert r["tau"] == pytest.approx(1 + sum(by_position))
        assert trained["tau"] > untrained["tau"], f"T={report['temperature']}: training did not raise τ"


def test_fit_with_a_draft_vocabulary(tiny_cache, tiny_target, tmp_path) -> None:  # noqa: ANN001
    """`draft_vocab_size` keeps the training data's most frequent tokens (stop tokens always), ships
    the map in the checkpoint, and the drafter trained over it learns, drafts inside it and stays
    lossless."""
    from specray.workers.drafters.draft_vocab import coverage, frequent_tokens

    config = replace(_short_fit("dspark", True, tiny_cache, tmp_path / "vocab"), draft_vocab_size=24)
    fit(config, tiny_target, progress=False)
    history = json.loads((tmp_path / "vocab" / "train_log.json").read_text())["history"]
    assert sum(h["ce"] for h in history[-4:]) < 0.9 * sum(h["ce"] for h in history[:4])

    data = TargetCache(tiny_cache, "train")
    expected = frequent_tokens(
        ((s.ids, s.loss_mask) for s in (data[i] for i in range(len(data)))), 24, tiny_target
    )
    model = load_drafter_model(tmp_path / "vocab")
    assert model.config.draft_vocab_size == 24 and model.config.markov_tied
    assert model.draft_ids.tolist() == expected.ids.tolist(), "the checkpoint's map is not the data's"
    assert set(tiny_target.stop_token_ids) <= set(model.draft_ids.tolist())

    reports = score_drafters([tmp_path / "vocab"], tiny_target, "tiny", tiny_cache, split="train")
    scored = reports[0]["results"][0]
    responses = torch.cat([data[i].ids[data[i].loss_mask] for i in range(len(data))])
    assert scored["tau"] > 1.0
    assert scored["vocab_coverage"] == pytest.approx(coverage(expected, responses))
    assert 0.0 < scored["vocab_coverage"] <= 1.0

    drafter = load_drafter(tmp_path / "vocab", tiny_target)
    # Training prompts: the tiny target's text there is what the drafter learnt to predict.
    prompts = [data[i].ids[: int((~data[i].loss_mask).sum())].tolist() for i in range(2)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = LLMEngine(tiny_target, None, EngineConfig(num_speculative_tokens=0)).generate(prompts, params)
    spec = LLMEngine(tiny_target, drafter, EngineConfig(num_speculative_tokens=7)).generate(prompts, params)
    assert [s.output_ids for s in spec] == [s.output_ids for s in plain]
    assert sum(s.stats.accepted_tokens for s in spec) > 0


def test_the_teachers_head_gives_the_target_distribution_outside_autocast(tiny_cache, tiny_target) -> None:  # noqa: ANN001
    """A bf16-feature fit scores blocks against its bf16 copy of the target: the target's
    distribution is that copy's LM head over the bf16 final states, computed in bf16 as a bf16
    engine serves it, even inside the fit's autocast."""
    data = TargetCache(tiny_cache, "train")
    sample = data[0]
    model = build_model(drafter_config(FitConfig(kind="dspark"), tiny_target, data.feature_layers))
    teacher = copy.deepcopy(tiny_target.model).to(torch.bfloat16)
    anchors = torch.tensor([1, 2, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blocks = teacher_forced_blocks(model, tiny_target.model, [sample], [anchors], teacher)
    _, _, target_pos = block_labels(sample.ids, sample.loss_mask, anchors, model.config.draft_block_size)
    with torch.no_grad():
        logits = teacher.compute_logits(sample.final_hidden[target_pos].to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16
    assert torch.equal(blocks.target.inside, logits.float().softmax(-1)), (
        "the blocks' target distribution is not the teacher's bf16 head over the final states"
    )


def _truncated(sample: CachedSample, length: int) -> CachedSample:
    return CachedSample(
        sample.features[:length], sample.final_hidden[:length], sample.ids[:length], sample.loss_mask[:length]
    )


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_one_padded_forward_gives_each_sequences_loss_and_gradients(kind, tiny_cache, tiny_target) -> None:  # noqa: ANN001
    """A fit step scores its sequences in one drafter forward, padded to the longest sequence and
    the most anchors: the loss, metrics and gradients are the mean of each sequence's own, with a
    sequence left out (no anchors) counting 0 — as when each sequence ran alone."""
    data = TargetCache(tiny_cache, "train")
    config = FitConfig(kind=kind, markov_rank=8, state_input=True, markov_tied=True)
    torch.manual_seed(0)
    model = build_model(drafter_config(config, tiny_target, data.feature_layers))
    for name, parameter in model.named_parameters():
        if name.startswith("markov_out"):  # zero at the start of training; exercise the Markov path
            torch.nn.init.normal_(parameter)
    samples = [_truncated(data[i], length) for i, length in ((0, 48), (1, 30), (2, 41))]
    generator = torch.Generator().manual_seed(1)
    anchors = [
        choose_anchors(s.loss_mask, most, generator, config.drafter_kind.first_anchor)
        for s, most in zip(samples, (6, 3, 5))
    ]
    assert [a.numel() for a in anchors] == [6, 3, 5]
    parameters = [p for p in model.parameters() if p.requires_grad]
    loss, metrics = batch_loss(model, tiny_target.model, samples, anchors, config.loss_weights, 4)
    batched = torch.autograd.grad(loss, parameters, allow_unused=True)
    alone_loss, alone_metrics, alone = 0.0, {}, [torch.zeros_like(p) for p in parameters]
    for sample, at in zip(samples, anchors):
        part, part_metrics = batch_loss(model, tiny_target.model, [sample], [at], config.loss_weights, 1)
        for total, grad in zip(alone, torch.autograd.grad(part, parameters, allow_unused=True)):
            if grad is not None:
                total += grad / 4
        alone_loss += float(part.detach()) / 4
        for key, value in part_metrics.items():
            alone_metrics[key] = alone_metrics.get(key, 0.0) + value / 4
    assert float(loss.detach()) == pytest.approx(alone_loss, rel=1e-5), (
        "batched loss is not the mean of the sequences'"
    )
    assert metrics == pytest.approx(alone_metrics, rel=1e-5, abs=1e-6), "batched metrics differ"
    for (name, _), got, want in zip(model.named_parameters(), batched, alone):
        got = torch.zeros_like(want) if got is None else got
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), f"gradient of {name} differs when batched"
