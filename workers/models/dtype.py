"""The engine's dtype setting: `auto` picks bf16 where it is fast (CUDA, or a CPU with native bf16:
AMX-BF16 or AVX-512 BF16) and fp32 elsewhere; the other names are taken as they are. Importing it costs nothing (the CLI
lists the choices before torch is loaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    import torch

    from specray.kernels.cpu_features import has_bf16

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        fast = torch.device(device).type == "cuda" or has_bf16()
        return torch.bfloat16 if fast else torch.float32
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {name!r}")
    return getattr(torch, name)
