"""What the trained drafters share on the engine side: a model bound to its frozen target, and the
target features each sequence has delivered so far (kept per sequence, dropped on release)."""

from __future__ import annotations

import torch

from specray.workers.drafters.context_cache import ContextCache
from specray.workers.drafters.layers import FeatureDrafterBackbone
from specray.workers.engine.drafter import Drafter
from specray.workers.models.decoder import DecoderModel


class FeatureDrafter(Drafter):
    def __init__(self, model: FeatureDrafterBackbone, target: DecoderModel) -> None:
        self.model = model.eval()
        self.target = target
        self.config = model.config
        self.name = model.config.kind
        self.feature_layers = model.config.feature_layers
        self.cache = ContextCache()

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:
        self.cache.observe(seq_id, features.float(), start)

    def release(self, seq_id: str) -> None:
        self.cache.release(seq_id)
