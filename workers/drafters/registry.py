"""Drafters by name: `none` (autoregressive), `ngram`, or a trained drafter's checkpoint path."""

from __future__ import annotations

from specray.workers.drafters.base import Drafter
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.models.loader import LoadedModel

DRAFTER_CHOICES_HELP = "none (autoregressive), ngram (prompt lookup), or a trained drafter's directory"


def build_drafter(name: str, target: LoadedModel) -> Drafter | None:
    if name == "none":
        return None
    if name == "ngram":
        return NgramDrafter()
    raise ValueError(f"unknown drafter {name!r}: {DRAFTER_CHOICES_HELP}")
