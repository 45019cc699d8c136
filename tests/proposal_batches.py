"""A drafter's proposals for a batch of sequences against its proposals for each one alone."""

from __future__ import annotations

import torch

from specray.workers.drafters.feature_drafter import FeatureDrafter
from specray.workers.engine.drafter import DraftRequest
from specray.workers.engine.sampling import SamplingParams

LENGTHS = [9, 14, 20]


def observe_sequences(
    drafters: list[FeatureDrafter], lengths: list[int], feature_width: int
) -> list[list[int]]:
    """Random token ids of sequences s0, s1, … of `lengths`, whose features (all but the anchor's)
    every drafter observes alike."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]
    for i, n in enumerate(lengths):
        features = torch.randn(n - 1, feature_width, generator=g)
        for drafter in drafters:
            drafter.observe(f"s{i}", features, 0)
    return ids


def draft_requests(
    ids: list[list[int]], limits: list[int], temperatures: list[float], first_seed: int = 0
) -> list[DraftRequest]:
    """One request per sequence s{i}, each with its own seeded random stream."""
    return [
        DraftRequest(
            f"s{i}",
            ids[i],
            limits[i],
            SamplingParams(max_tokens=50, temperature=temperatures[i]),
            torch.Generator().manual_seed(first_seed + i),
        )
        for i in range(len(ids))
    ]


def assert_batched_proposals_match_alone(
    batched: FeatureDrafter,
    single: FeatureDrafter,
    limits: list[int],
    temperatures: list[float],
    feature_width: int,
) -> None:
    """Two drafters over the same model see the same features of len(LENGTHS) sequences; `batched`
    proposes for all of them at once, `single` for each alone, twice (the second proposal reads
    what the first cached). Drafts, draft probabilities and confidences must be identical."""
    ids = observe_sequences([batched, single], LENGTHS, feature_width)
    for _ in range(2):
        together = batched.propose(draft_requests(ids, limits, temperatures))
        alone = [single.propose([r])[0] for r in draft_requests(ids, limits, temperatures)]
        for i, (a, b) in enumerate(zip(together, alone)):
            assert a.tokens == b.tokens, f"row {i}: batched drafts {a.tokens}, alone {b.tokens}"
            assert a.confidence == b.confidence, f"row {i}: confidences change with the batch"
            assert (a.probs is None) == (b.probs is None)
            assert a.probs is None or torch.equal(a.probs, b.probs), f"row {i}: draft probabilities change"
