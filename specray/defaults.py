"""Names and places every layer shares, importable without torch, Ray or transformers.

The CLI reads them to print its help (`specray --help` must not load torch), the cluster config
for its defaults, the model loader and the launcher for where run-time state goes.
"""

from __future__ import annotations

from pathlib import Path

# The packaged default target; `workers/models/loader.py` resolves it (a test checks they agree).
DEFAULT_MODEL = "smollm2-135m"

# The drafter when none is named: for the default model the hybrid of n-gram lookup and its bundled
# DSpark drafter (it beats n-gram lookup in `specray bench engine`, drafters/README.md); n-gram
# lookup for other models, which have no bundled drafter.
DEFAULT_DRAFTER = "hybrid:smollm2-135m-dspark"


def default_drafter(model: str) -> str:
    return DEFAULT_DRAFTER if model == DEFAULT_MODEL else "ngram"


def checkout_root() -> Path | None:
    """The repository this package runs from (an editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "specray").is_dir() else None


def default_cache_dir() -> Path:
    """The model cache (converted GGUF files, step curves) when $SPECRAY_CACHE_DIR is unset: a
    checkout's `.scratch/cache` (ignored by git, removed by `make clean`), else `~/.cache/specray`."""
    root = checkout_root()
    return root / ".scratch" / "cache" if root is not None else Path.home() / ".cache" / "specray"


def run_dir() -> Path:
    """Where `specray serve` keeps its run state (Redis's directory, Ray's token, the address file
    `specray status` reads): a checkout's `.scratch/run`, else `~/.cache/specray/run`."""
    root = checkout_root()
    return root / ".scratch" / "run" if root is not None else Path.home() / ".cache" / "specray" / "run"
