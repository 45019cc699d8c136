"""Cluster test setup: offline, state under the repository's .scratch/, the real SmolLM2 target."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("SPECRAY_CACHE_DIR", str(REPO / ".scratch" / "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def smollm2():
    from specray.workers.models.loader import load_model

    return load_model("smollm2-135m")
