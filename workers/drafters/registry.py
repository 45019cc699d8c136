"""Drafters by name: `none` (autoregressive), `ngram`, or a trained drafter (bundled name or path)."""

from __future__ import annotations

from specray.workers.drafters.base import Drafter
from specray.workers.drafters.checkpoint import BUNDLED_DRAFTERS, is_drafter_checkpoint, load_drafter
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.models.loader import LoadedModel

DRAFTER_CHOICES_HELP = (
    "none (autoregressive), ngram (prompt lookup), a bundled trained drafter "
    f"({', '.join(sorted(BUNDLED_DRAFTERS))}) or a trained drafter's directory"
)


def build_drafter(name: str, target: LoadedModel | None) -> Drafter | None:
    """The drafter called `name`; trained drafters need the target (they share its embedding/LM head)."""
    if name == "none":
        return None
    if name == "ngram":
        return NgramDrafter()
    if is_drafter_checkpoint(name):
        if target is None:
            raise ValueError(f"drafter {name!r} is a trained model and needs its target model")
        return load_drafter(name, target)
    raise ValueError(f"unknown drafter {name!r}: {DRAFTER_CHOICES_HELP}")
