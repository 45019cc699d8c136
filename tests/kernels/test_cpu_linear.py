"""Our packed bf16 GEMM (`kernels/cpu_gemm.cpp`, `cpu_linear.py`; AMX tiles or vdpbf16ps, whichever
this CPU runs for a shape): agrees with an fp32 matmul within one bf16 rounding, gives a row the
same bits alone, in any batch and on any thread count, repacks a weight that changed, and steps
aside for fp32 and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specray.kernels import cpu_attention
from specray.kernels.cpu_linear import linear, uses_packed_gemm

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def packed_gemm():
    if not uses_packed_gemm(torch.bfloat16, CPU):
        pytest.skip(
            "this CPU runs bf16 linear layers on oneDNN (no AVX-512 BF16, no compiler, or SPECRAY_CPU_GEMM=onednn)"
        )


def _layer(k: int, n: int, bias: bool) -> nn.Linear:
    torch.manual_seed(k + n)
    layer = nn.Linear(k, n, bias=bias).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.05)
    return layer


# SmolLM2's projections and LM head, and odd sizes: N not a multiple of 16 or 64, a bias, and K not
# a multiple of 32 (on an AMX CPU the one layer that runs vdpbf16ps instead of tiles).
SHAPES = [
    (576, 960, False),
    (1536, 576, False),
    (576, 49152, False),
    (64, 40, True),
    (32, 17, True),
    (48, 24, True),
]


@pytest.mark.parametrize(("k", "n", "bias"), SHAPES, ids=lambda v: str(v))
def test_matches_an_fp32_matmul_within_a_bf16_rounding(k, n, bias):
    layer = _layer(k, n, bias)
    x = torch.randn(37, k).to(torch.bfloat16)
    with torch.inference_mode():
        out = linear(x, layer)
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float() if bias else None)
    assert out.dtype == torch.bfloat16 and out.shape == (37, n)
    err = (out.float() - exact).abs().max().item()
    # One rounding to bf16 (2^-8 relative) plus fp32 sums in another order.
    assert err <= 2**-7 * exact.abs().max().item(), f"max error {err} for [{k}→{n}]"


@pytest.mark.parametrize(("k", "n", "bias"), SHAPES[:1] + SHAPES[3:], ids=lambda v: str(v))
def test_a_row_has_the_same_bits_in_every_batch_and_thread_count(k, n, bias):
    layer = _layer(k, n, bias)
    x = torch.randn(300, k).to(torch.bfloat16)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        full = linear(x, layer)
        for rows in (slice(0, 1), slice(0, 2), slice(0, 3), slice(5, 13), slice(0, 17), slice(250, 300)):
            assert torch.equal(linear(x[rows], layer), full[rows]), (
                f"rows {rows} differ from the batch of 300"
            )
        alone = torch.stack([linear(x[i : i + 1], layer)[0] for i in range(0, 300, 23)])
        assert torch.equal(alone, full[::23]), "a row computed alone differs from the same row in a batch"
        torch.set_num_threads(1)
        try:
            assert torch.equal(linear(x, layer), full), "1 thread gives other bits than the default count"
        finally:
            torch.set_num_threads(threads)


def test_a_changed_weight_is_packed_again():
    layer = _layer(64, 48, False)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.inference_mode():
        before = linear(x, layer)
    with torch.no_grad():
        layer.weight.mul_(2)
    with torch.inference_mode():
        after = linear(x, layer)
    assert torch.equal(after, (2 * before.float()).to(torch.bfloat16)), "a stale packed weight was used"


def test_fp32_and_autograd_take_pytorch_linear():
    layer = _layer(64, 48, True).float()
    x = torch.randn(3, 64)
    # fp32 runs oneDNN in an invariant block of 4 rows (`batch_invariance.py`): the 3 rows padded.
    padded = F.linear(torch.cat((x, x[-1:])), layer.weight, layer.bias)[:3]
    assert torch.equal(linear(x, layer), padded), "fp32 left oneDNN's padded 4-row block"
    trained = _layer(64, 48, False).requires_grad_(True)
    out = linear(x.to(torch.bfloat16), trained)
    assert out.requires_grad, "a layer being trained must keep its autograd graph"


def test_the_extension_refuses_mismatched_shapes():
    ext = cpu_attention.extension()
    packed = ext.pack_bf16_weight(torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="does not match"):
        ext.linear_bf16(torch.zeros(2, 32, dtype=torch.bfloat16), packed, 32, None)
    with pytest.raises(RuntimeError, match="K must be even"):
        ext.pack_bf16_weight(torch.zeros(4, 5, dtype=torch.bfloat16))
