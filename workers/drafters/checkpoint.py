"""Drafter checkpoints: a directory of config.json + model.safetensors (the drafter's own weights).

The frozen target embedding and LM head are not stored: the loader takes them from the target.
Bundled drafters ship inside the package (`specray.drafters`), so they resolve from a wheel too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.kinds import DrafterModel, trained_kind
from specray.workers.engine.drafter import Drafter
from specray.workers.models.loader import LoadedModel

_BUNDLED_ROOT = resources.files("specray.drafters")
# The bundled trained drafters, by the name `--drafter` accepts.
BUNDLED_DRAFTERS = {
    entry.name: Path(str(entry))
    for entry in _BUNDLED_ROOT.iterdir()
    if entry.is_dir() and entry.joinpath("config.json").is_file()
}


def build_model(config: DrafterConfig) -> DrafterModel:
    return trained_kind(config.kind).build(config)


def save_drafter_model(model: DrafterModel, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Weights are stored in bf16 by default: half the size, and drafts need no more precision.
    Integer tensors (a draft vocabulary's token ids) keep their type."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "config.json")
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, path / "model.safetensors", metadata={"kind": model.config.kind})


def load_drafter_config(path_or_name: str | Path) -> DrafterConfig:
    """A checkpoint's config alone (e.g. its feature layers), without building the model."""
    return DrafterConfig.load(resolve_drafter_path(path_or_name) / "config.json")


def load_drafter_model(path_or_name: str | Path, device: str | torch.device = "cpu") -> DrafterModel:
    path = resolve_drafter_path(path_or_name)
    model = build_model(DrafterConfig.load(path / "config.json"))
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    return model.to(device).float()


def resolve_drafter_path(path_or_name: str | Path) -> Path:
    if str(path_or_name) in BUNDLED_DRAFTERS:
        return BUNDLED_DRAFTERS[str(path_or_name)]
    path = Path(path_or_name)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no drafter checkpoint (config.json + model.safetensors) at {path}")
    return path


def is_drafter_checkpoint(path_or_name: str | Path) -> bool:
    try:
        resolve_drafter_path(path_or_name)
    except FileNotFoundError:
        return False
    return True


def load_drafter(path_or_name: str | Path, target: LoadedModel) -> Drafter:
    """A trained drafter (any kind of the table) ready for the engine, bound to its target."""
    # Loaded in fp32; the drafter takes its compute dtype from the target (feature_drafter.py).
    model = load_drafter_model(path_or_name, next(target.model.parameters()).device)
    model.config.check_target(target.config)
    return trained_kind(model.config.kind).drafter(model, target.model)
