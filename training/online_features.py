"""Target features computed while training: the target cache's samples without the disk.

A cache costs ~7 kB per token for SmolLM2 (m = 5 layers × 576 + 576 final, bf16), ~35 GB for
20k responses of ≤ 256 tokens with their prompts. Computing the features on the fly instead costs
one target prefill of each step's sequences, batched, and nothing on disk: the way to train on a
GPU, where the prefill is cheap, and on a CPU whose disk is short. Samples are the ones the cache
would hold (rounded through bf16), so either source trains the same drafter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from specray.training.target_cache import (
    CachedSample,
    TargetCache,
    TargetFeatureRunner,
    usable_records,
)
from specray.workers.models.loader import LoadedModel


class OnlineTargetFeatures:
    """One split of `specray train data`'s records; samples come from running the target."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        target: LoadedModel,
        feature_layers: tuple[int, ...],
        batch_tokens: int = 8192,
    ) -> None:
        self.records = usable_records(Path(data_dir), split)
        self.feature_layers = tuple(feature_layers)
        self._runner = TargetFeatureRunner(target, self.feature_layers, batch_tokens)

    def __len__(self) -> int:
        return len(self.records)

    def samples(self, indices: list[int]) -> list[CachedSample]:
        """The samples of these records, from one batched target forward per `batch_tokens`."""
        return self._runner.samples([self.records[i] for i in indices])

    def __getitem__(self, i: int) -> CachedSample:
        return self.samples([i])[0]

    def token_samples(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, loss mask) of every sample, from the records alone (no target forward)."""
        for r in self.records:
            prompt, output = r["prompt_ids"], r["output_ids"]
            mask = torch.zeros(len(prompt) + len(output), dtype=torch.bool)
            mask[len(prompt) :] = True
            yield torch.tensor(prompt + output, dtype=torch.long), mask


FeatureSource = TargetCache | OnlineTargetFeatures


def is_target_cache(directory: str | Path) -> bool:
    """Whether `directory` is a built target cache (else a `train data` directory)."""
    return (Path(directory) / "manifest.json").exists()


def open_features(
    directory: str | Path, split: str, target: LoadedModel, feature_layers: tuple[int, ...]
) -> FeatureSource:
    """A built target cache (it has a manifest) or, for a `specray train data` directory, the same
    samples computed online with `feature_layers`."""
    if is_target_cache(directory):
        return TargetCache(directory, split)
    return OnlineTargetFeatures(directory, split, target, feature_layers)
