"""Drafters by name: `none` (autoregressive), `ngram`, a trained drafter (bundled name or path), or
`hybrid:<trained DSpark drafter>` (n-gram or block per request and step, hybrid.py).

Serving, `specray generate`, benches and evaluation all build drafters here.
"""

from __future__ import annotations

from specray.workers.drafters.checkpoint import (
    BUNDLED_DRAFTERS,
    is_drafter_checkpoint,
    load_drafter,
    load_drafter_config,
)
from specray.workers.drafters.dspark import DSparkDrafter
from specray.workers.drafters.hybrid import HybridDrafter
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.drafter import Drafter
from specray.workers.models.loader import LoadedModel

# Drafters that need no target weights (nor target features), by name.
MODEL_FREE_DRAFTERS = {"none": None, "ngram": NgramDrafter}
HYBRID_PREFIX = "hybrid:"

DRAFTER_CHOICES_HELP = (
    "none (autoregressive), ngram (prompt lookup), a bundled trained drafter "
    f"({', '.join(sorted(BUNDLED_DRAFTERS))}), a trained drafter's directory, or "
    f"{HYBRID_PREFIX}<trained dspark drafter> (n-gram or its block, whichever is expected to go further)"
)


def trained_drafter_name(name: str) -> str:
    """The trained checkpoint a drafter name stands on (a hybrid's block drafter)."""
    return name.removeprefix(HYBRID_PREFIX)


def needs_target(name: str) -> bool:
    """Whether the drafter shares the target's weights (trained drafters) and reads its features."""
    return name not in MODEL_FREE_DRAFTERS


def build_drafter(name: str, target: LoadedModel | None) -> Drafter | None:
    """The drafter called `name`; trained drafters need the target (they share its embedding/LM head)."""
    if name in MODEL_FREE_DRAFTERS:
        factory = MODEL_FREE_DRAFTERS[name]
        return factory() if factory is not None else None
    if name.startswith(HYBRID_PREFIX):
        block = build_drafter(trained_drafter_name(name), target)
        if not isinstance(block, DSparkDrafter) or not block.config.confidence:
            raise ValueError(f"drafter {name!r}: a hybrid needs a trained dspark drafter (with confidences)")
        return HybridDrafter(block)
    if is_drafter_checkpoint(name):
        if target is None:
            raise ValueError(f"drafter {name!r} is a trained model and needs its target model")
        return load_drafter(name, target)
    raise ValueError(f"unknown drafter {name!r}: {DRAFTER_CHOICES_HELP}")


def drafter_feature_layers(name: str) -> tuple[int, ...]:
    """The target layers whose hidden states the drafter reads, from its config alone."""
    return load_drafter_config(trained_drafter_name(name)).feature_layers if needs_target(name) else ()


def check_num_speculative_tokens(name: str, num_speculative_tokens: int) -> None:
    """Raise ValueError when a trained drafter's block is shorter than γ: it could never fill it."""
    if not needs_target(name):
        return
    block = load_drafter_config(trained_drafter_name(name)).draft_block_size
    if num_speculative_tokens > block:
        raise ValueError(
            f"num_speculative_tokens ({num_speculative_tokens}) exceeds drafter {name!r}'s "
            f"draft_block_size ({block})"
        )
