"""The chi-square check the sampling tests share: observed outcomes against an exact distribution."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping

import torch
from scipy.stats import chisquare

from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.engine.sampling import SamplingParams, apply_penalties, target_distribution
from specray.workers.models.loader import LoadedModel


def exact_joint(
    target: LoadedModel, prompt: list[int], params: SamplingParams, length: int, vocab: int
) -> dict[tuple[int, ...], float]:
    """P(x_1..x_length | prompt) under the target's sampling distribution (penalties included),
    by enumerating every continuation of a small vocabulary."""
    probs = {}
    for prefix in itertools.product(range(vocab), repeat=length - 1):
        runner = ModelRunner(target.model, kv_cache_tokens=64, block_size=4)
        logits = runner.run([ScheduledSequence("s", prompt + list(prefix), length)]).logits[0]
        # Position k's penalties count the k tokens before it, one position at a time.
        dist = torch.cat(
            [
                target_distribution(apply_penalties(logits[k : k + 1], params, prompt, prefix[:k]), params)
                for k in range(length)
            ]
        )
        p = 1.0
        for k, token in enumerate(prefix):
            p *= float(dist[k, token])
        for last in range(vocab):
            probs[prefix + (last,)] = p * float(dist[-1, last])
    return probs


def assert_follows(
    counts: Mapping[Hashable, int], exact: Mapping[Hashable, float], alpha: float, what: str
) -> None:
    """Fail when an impossible outcome was sampled, or when the counts deviate from `exact`
    (outcomes with tiny expected counts pooled into one bin, as chi-square needs)."""
    impossible = [o for o in exact if exact[o] == 0.0 and counts.get(o, 0) > 0]
    assert not impossible, f"{what}: sampled outcomes the target can never produce: {impossible[:5]}"
    total = sum(counts.values())
    outcomes = sorted((o for o in exact if exact[o] > 0.0), key=exact.get, reverse=True)
    big = [o for o in outcomes if exact[o] * total >= 5]
    small = [o for o in outcomes if o not in big]
    observed = [counts.get(o, 0) for o in big] + ([sum(counts.get(o, 0) for o in small)] if small else [])
    expected = [exact[o] * total for o in big] + ([sum(exact[o] for o in small) * total] if small else [])
    scale = sum(observed) / sum(expected)
    p_value = chisquare(observed, [e * scale for e in expected]).pvalue
    assert p_value > alpha, f"{what} deviate from the target distribution (p = {p_value:.2e})"
