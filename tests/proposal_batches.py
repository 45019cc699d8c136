"""A drafter's proposals for a batch of sequences against its proposals for each one alone."""

from __future__ import annotations

import torch

from specray.workers.engine.drafter import Drafter, DraftRequest
from specray.workers.engine.sampling import SamplingParams

LENGTHS = [9, 14, 20]


def assert_batched_proposals_match_alone(
    batched: Drafter, single: Drafter, limits: list[int], temperatures: list[float], feature_width: int
) -> None:
    """Two drafters over the same model see the same features of len(LENGTHS) sequences; `batched`
    proposes for all of them at once, `single` for each alone, twice (the second proposal reads
    what the first cached). Drafts, draft probabilities and confidences must be identical."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 96, (n,), generator=g).tolist() for n in LENGTHS]
    for i, n in enumerate(LENGTHS):
        features = torch.randn(n - 1, feature_width, generator=g)
        batched.observe(f"s{i}", features, 0)
        single.observe(f"s{i}", features, 0)

    def requests() -> list[DraftRequest]:
        return [
            DraftRequest(
                f"s{i}",
                ids[i],
                limits[i],
                SamplingParams(max_tokens=50, temperature=temperatures[i]),
                torch.Generator().manual_seed(i),
            )
            for i in range(len(LENGTHS))
        ]

    for _ in range(2):
        together = batched.propose(requests())
        alone = [single.propose([r])[0] for r in requests()]
        for i, (a, b) in enumerate(zip(together, alone)):
            assert a.tokens == b.tokens, f"row {i}: batched drafts {a.tokens}, alone {b.tokens}"
            assert a.confidence == b.confidence, f"row {i}: confidences change with the batch"
            assert (a.probs is None) == (b.probs is None)
            assert a.probs is None or torch.equal(a.probs, b.probs), f"row {i}: draft probabilities change"
