"""Resumable training: the whole training state, saved every N steps or minutes, atomically.

The state is what a restart needs to continue as if never stopped: model and optimizer (AdamW's
moments), the LR schedule, the step (which fixes the data position: each epoch's order and each
step's anchors are seeded by epoch and step), the planned total, the loss history and the RNG
states. It is written to a temporary file and renamed over the last one, so a process killed while
saving leaves the previous checkpoint intact. A checkpoint is only resumed by the run that wrote
it: the settings that shape the schedule are stored and compared.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch


class ResumeMismatch(ValueError):
    """The checkpoint was written with other settings than this run's."""


class TrainingCheckpoint:
    def __init__(
        self, path: Path, fingerprint: dict[str, Any], every_steps: int, every_seconds: float | None = None
    ) -> None:
        if every_steps < 1 or (every_seconds is not None and every_seconds <= 0):
            raise ValueError("checkpoint every_steps must be >= 1 and every_seconds > 0")
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._last_save = time.monotonic()

    def due(self, step: int, last_step: int) -> bool:
        """Save after every `every_steps` steps, after `every_seconds` since the last save, and at the end."""
        if step % self.every_steps == 0 or step >= last_step:
            return True
        return self.every_seconds is not None and time.monotonic() - self._last_save >= self.every_seconds

    def save(self, state: dict[str, Any]) -> None:
        full = {
            **state,
            "fingerprint": self.fingerprint,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save(full, tmp)
        os.replace(tmp, self.path)
        self._last_save = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """The saved state with its RNG states restored, or None when there is none to resume."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False, map_location="cpu")
        saved = state.get("fingerprint", {})
        changed = sorted(
            k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k)
        )
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} → {self.fingerprint.get(k)!r}" for k in changed)
            raise ResumeMismatch(
                f"{self.path} was written with other settings ({detail}); "
                "use another --out, or delete it to start over"
            )
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state
