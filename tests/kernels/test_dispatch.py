"""`specray.kernels` runs the twins on CPU tensors without importing Triton, the kernels on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import acceptance_inputs, attention_inputs, markov_inputs

import specray.kernels as K
from specray.kernels import acceptance, attention, cpu_attention, markov_sampling

CPU_ONLY_SCRIPT = """
import sys
import torch
import specray.kernels as K
from specray.kernels.attention import build_attention_metadata
g = torch.Generator().manual_seed(0)
probs = torch.softmax(torch.randn(2, 3, 10, generator=g), -1)
K.accept_drafts(torch.zeros(2, 2, dtype=torch.long), torch.tensor([2, 1]), probs, None,
                torch.tensor([True, False]), torch.rand(2, 3, generator=g))
K.sample_markov_block(torch.randn(2, 2, 10), torch.tensor([1, 2]), torch.tensor([0.0, 1.0]), torch.rand(2, 2))
meta = build_attention_metadata(torch.tensor([[0]], dtype=torch.int32), [2], [3], 4)
K.paged_attention(torch.randn(2, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), meta, 0.3)
assert "triton" not in sys.modules, "a CPU call imported triton"
"""


def test_cpu_path_never_imports_triton() -> None:
    # A fresh interpreter: this test process has Triton loaded by the kernel tests.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", CPU_ONLY_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_cpu_tensors_take_the_twins() -> None:
    args = acceptance_inputs(4, 3, 50, torch.float32, 0)
    assert all(map(torch.equal, K.accept_drafts(**args), acceptance.accept_drafts(**args)))
    args = markov_inputs(4, 3, 50, 8, 16, torch.float32, 0)
    assert torch.equal(
        K.sample_markov_block(**args).tokens, markov_sampling.sample_markov_block(**args).tokens
    )
    q, k_cache, v_cache, meta = attention_inputs([3, 1], [9, 4], 4, 2, 16, 4, torch.float32, 0)
    assert not K.use_triton(q)
    # Attention on the CPU takes the compiled batch-invariant kernel where it builds, else the twin;
    # either way the twin's result up to fp32 rounding.
    dispatched = K.paged_attention(q, k_cache, v_cache, meta, 0.25)
    twin = attention.paged_attention(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(dispatched, twin, rtol=1e-5, atol=1e-5)
    compiled = cpu_attention.extension()
    if compiled is not None:
        direct = compiled.paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, 0.25, 0, 0.0
        )
        assert torch.equal(dispatched, direct), "CPU attention did not run the compiled kernel"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_take_the_kernels() -> None:
    from specray.kernels.triton_acceptance import accept_drafts_triton

    args = acceptance_inputs(4, 3, 50, torch.float32, 0, device="cuda")
    assert K.use_triton(args["target_probs"])
    assert all(map(torch.equal, K.accept_drafts(**args), accept_drafts_triton(**args)))
