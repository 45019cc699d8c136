"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test imports a
kernel module. With CUDA and no interpreter the same tests run compiled on the GPU (`-m gpu`).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(
    params=[
        pytest.param(
            "cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="compiled Triton needs CUDA tensors")
        ),
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA device"
                ),
            ],
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    """Where the kernels under test run: CPU under the interpreter, or the GPU."""
    return request.param
