"""Where run-time state goes by default: inside the checkout this package runs from."""

from __future__ import annotations

from pathlib import Path

from specray.defaults import checkout_root, default_cache_dir, run_dir
from specray.workers.models.loader import cache_dir

REPO = Path(__file__).resolve().parents[1]


def test_a_checkout_keeps_its_state_in_scratch(monkeypatch):
    assert checkout_root() == REPO
    assert default_cache_dir() == REPO / ".scratch" / "cache"
    assert run_dir() == REPO / ".scratch" / "run"
    monkeypatch.delenv("SPECRAY_CACHE_DIR", raising=False)
    assert cache_dir() == REPO / ".scratch" / "cache"  # not ~/.cache/specray
