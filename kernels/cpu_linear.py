"""Linear layers for inference on the CPU. bf16 on CPUs with AVX-512 BF16: our own GEMM
(`cpu_gemm.cpp`, on AMX tiles where the CPU has them) over weights packed once per layer.

Measured on the 2-core dev CPU (AMD EPYC, AVX-512 BF16, no AMX), 1 thread, against `F.linear`
(oneDNN): 576→3072 at 1 row 47 µs vs 197, at 8 rows 129 vs 272, at 256 rows 4.6 ms vs 4.9; the
49,152-token LM head at 1 row 2.6 ms vs 9.8; a 1-token decode step of SmolLM2-135M about 2.3x
faster. `tests/kernels/test_cpu_linear.py` pins the numerics. On a 2-core AMX Xeon our GEMM runs
on AMX tiles and costs about the same for 1 and 8 rows; there oneDNN's bf16 linear (which reorders
the weight on every call) took 2.0 ms for the LM head at 1 row, and `specray bench engine` decoded
23.1 tokens/s on oneDNN against 46.4 on our GEMM (back to back). `SPECRAY_CPU_GEMM=onednn` forces
oneDNN anywhere.
Batch-invariant by construction, at every row count; oneDNN's GEMM is called in row blocks that
make it so (`batch_invariance.py`).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from specray.kernels import cpu_attention
from specray.kernels.batch_invariance import ONEDNN_ROW_BLOCKS, linear_in_blocks
from specray.kernels.cpu_features import cpu_flags

GEMM_ENV = "SPECRAY_CPU_GEMM"
_CHOICES = ("auto", "onednn", "avx512bf16")


@functools.cache
def _packed_gemm_available() -> bool:
    choice = os.environ.get(GEMM_ENV, "auto")
    if choice not in _CHOICES:
        raise ValueError(f"{GEMM_ENV}={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "onednn" or (choice == "auto" and "avx512_bf16" not in cpu_flags()):
        return False
    ext = cpu_attention.extension()
    return ext is not None and ext.has_bf16_gemm()


def uses_packed_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether linear layers in this dtype on this device run our packed bf16 GEMM."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _packed_gemm_available()


def cpu_decoder_layer(x: torch.Tensor) -> bool:
    """Whether a decoder layer over `x` may run as one C++ call (`cpu_layer.cpp`): inference in bf16
    where linear layers run our packed GEMM."""
    return x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and uses_packed_gemm(x.dtype, x.device)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer(x)` for inference on the CPU with each row's bits independent of the batch: through
    the packed bf16 GEMM where it applies, else oneDNN in invariant row blocks. Training (autograd
    or autocast, which recasts the weight on every call) gets one plain `F.linear`."""
    weight, bias = layer.weight, layer.bias
    if (
        x.device.type != "cpu"
        or x.dtype != weight.dtype
        or x.dtype not in ONEDNN_ROW_BLOCKS
        or torch.is_autocast_enabled("cpu")
        or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    ):
        return F.linear(x, weight, bias)
    if uses_packed_gemm(x.dtype, x.device) and weight.shape[1] % 2 == 0:
        out = cpu_attention.extension().linear_bf16(
            x.reshape(-1, weight.shape[1]), packed_weight(layer), weight.shape[0], bias
        )
        return out.view(*x.shape[:-1], weight.shape[0])
    return linear_in_blocks(
        x, weight.shape[0], lambda rows: F.linear(rows, weight, bias), ONEDNN_ROW_BLOCKS[x.dtype]
    )


def packed_weight(*layers: nn.Linear) -> torch.Tensor:
    """The layers' weights stacked by rows (one layer: its own weight) in the GEMM's layout, as one
    linear layer with their outputs side by side; packed on first use and again if a weight changed,
    kept as a plain attribute of the first layer (not a parameter, not saved)."""
    weights = tuple(layer.weight for layer in layers)
    versions = tuple(weight._version for weight in weights)
    key = "_packed_bf16" if len(layers) == 1 else f"_packed_bf16_with_{len(layers) - 1}"
    cached = layers[0].__dict__.get(key)
    if cached is None or any(a is not b for a, b in zip(cached[0], weights)) or cached[1] != versions:
        stacked = (
            torch.cat([weight.detach() for weight in weights]) if len(weights) > 1 else weights[0].detach()
        )
        cached = (weights, versions, cpu_attention.extension().pack_bf16_weight(stacked))
        layers[0].__dict__[key] = cached
    return cached[2]
