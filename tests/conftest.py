"""Shared test setup: everything offline, all state under the repository's .scratch/; the real
default target (SmolLM2) and a tiny random target fast enough for every drafter and training test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import make_tiny_target

from specray.workers.models.loader import LoadedModel

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SPECRAY_CACHE_DIR", str(REPO / ".scratch" / "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def cpu_attention_kernel() -> None:
    """Build (or load) the CPU attention kernel once, under the session's cache dir, before any
    test points SPECRAY_CACHE_DIR somewhere else."""
    from specray.kernels import cpu_attention

    cpu_attention.extension()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The real default target, SmolLM2-135M-Instruct (dequantized from the packaged GGUF once)."""
    from specray.workers.models.loader import load_model

    return load_model("smollm2-135m", "float32")


@pytest.fixture(scope="session")
def tiny_target() -> LoadedModel:
    return make_tiny_target()


@pytest.fixture(scope="session")
def small_vocab_target() -> LoadedModel:
    """A tiny target with enough layers for feature drafters and a vocabulary of 8, small enough to
    enumerate every continuation (distribution_check.exact_joint); its flat (tied) head puts mass on
    every token, so sampled drafts are often rejected."""
    return make_tiny_target(seed=3, vocab_size=8, embed_scale=0.1)
