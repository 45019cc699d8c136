"""The CPU's paged attention: a small C++ kernel (`cpu_attention.cpp`), compiled once per machine,
with the layer's row-wise ops (`cpu_rowwise.cpp`: RMSNorm, RoPE, the gated activation), row-wise
top-k for the Markov sampler's candidates (`cpu_select.cpp`) and its candidate loop (`cpu_markov.cpp`), our bf16
GEMM (`cpu_gemm.cpp`), the fused decoder layer (`cpu_layer.cpp`) and a drafter's fused block forward
(`cpu_draft_block.cpp`) in the same module.

It is batch-invariant by construction (each query row attends over exactly its own keys, in order),
which the lossless guarantee needs in every dtype: a token's logits must not depend on how many
drafts or other sequences share its step. The build lives in the specray cache, keyed by the
CPU's flags (it is compiled for this CPU); without a C++ compiler the plain-PyTorch twin runs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from specray.defaults import default_cache_dir
from specray.kernels.cpu_features import cpu_flags

logger = logging.getLogger(__name__)
_HEADERS = [Path(__file__).with_name(name) for name in ("cpu_ops.h", "cpu_vec.h")]
_SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "cpu_attention.cpp",
        "cpu_rowwise.cpp",
        "cpu_select.cpp",
        "cpu_markov.cpp",
        "cpu_gemm.cpp",
        "cpu_layer.cpp",
        "cpu_draft_block.cpp",
    )
]


# OpenMP: at::parallel_for then shares torch's intra-op threads (torch.set_num_threads).
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def _build_dir() -> Path:
    root = Path(os.environ.get("SPECRAY_CACHE_DIR", default_cache_dir()))
    flags = " ".join(sorted(cpu_flags()))
    recipe = (
        "".join(s.read_text() for s in _SOURCES + _HEADERS) + " ".join(_CFLAGS) + flags + torch.__version__
    )
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    path = root / "kernels" / f"cpu_attention-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernel, or None where it cannot be built (no compiler)."""
    from torch.utils.cpp_extension import load

    # torch looks for ninja on PATH; the `ninja` wheel puts it beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join((bin_dir, os.environ.get("PATH", "")))
    try:
        return load(
            name="specray_cpu_attention",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(_build_dir()),
            verbose=False,
        )
    except Exception as err:  # no compiler, or a failed build: the PyTorch twin still works
        logger.warning("CPU attention kernel unavailable (%s); using the PyTorch reference", err)
        return None
