"""The compiled row-wise ops (`kernels/cpu_rowwise.cpp`): RMSNorm, rotate-half RoPE and the MLP's
gated activation agree with
the decoder's PyTorch formulas within a dtype's rounding, give a row the same bits alone or in any
batch, and step aside wherever autograd needs a backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specray.kernels import cpu_attention, cpu_rowwise
from specray.workers.models.decoder import RMSNorm, apply_rotary

DTYPES = [torch.float32, torch.bfloat16]
# One rounding of the output, plus fp32 sums taken in another order than PyTorch's.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def compiled():
    if cpu_attention.extension() is None:
        pytest.skip("no C++ compiler here: the decoder runs its PyTorch formulas")


def _reference_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():  # the PyTorch path (the compiled one steps aside for autograd)
        norm.weight.requires_grad_(True)
        out = norm(x).detach()
        norm.weight.requires_grad_(False)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adds_one", [False, True], ids=["llama", "gemma"])
def test_rms_norm_matches_the_formula_and_is_batch_invariant(dtype, adds_one):
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5, adds_one).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(0.0 if adds_one else 1.0, 0.3)
    x = (3 * torch.randn(40, 576)).to(dtype)
    with torch.inference_mode():
        out = norm(x)
        alone = [norm(x[i : i + 1]) for i in (0, 17, 39)]
    want = _reference_norm(norm, x)
    assert torch.allclose(out.float(), want.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype]), (
        f"RMSNorm off by {(out.float() - want.float()).abs().max():.3g} in {dtype}"
    )
    for row, got in zip((0, 17, 39), alone):
        assert torch.equal(got[0], out[row]), f"row {row} alone differs from row {row} of 40"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_in_place_matches_rotate_half_and_is_batch_invariant(dtype):
    torch.manual_seed(1)
    qkv = torch.randn(12, (9 + 2 * 3) * 64).to(dtype)  # a fused projection: q and k are strided views
    q = qkv[:, : 9 * 64].view(12, 9, 64)
    angles = torch.rand(12, 32) * 6
    cos, sin = (
        torch.cat((angles, angles), -1).cos().to(dtype),
        torch.cat((angles, angles), -1).sin().to(dtype),
    )
    want = apply_rotary(q.float(), cos.float(), sin.float())
    kv_before = qkv[:, 9 * 64 :].clone()
    alone = q[5:6].clone()
    ops = cpu_rowwise(q, cos)
    ops.rotary_(q, cos, sin)
    ops.rotary_(alone, cos[5:6].contiguous(), sin[5:6].contiguous())
    assert torch.allclose(q.float(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype]), (
        f"RoPE off by {(q.float() - want).abs().max():.3g} in {dtype}"
    )
    assert torch.equal(alone[0], q[5]), "token 5 rotated alone differs from token 5 of 12"
    assert torch.equal(qkv[:, 9 * 64 :], kv_before), "rotating q wrote into the k and v columns"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu-tanh"])
def test_gated_activation_matches_act_gate_times_up_and_is_batch_invariant(dtype, gelu):
    torch.manual_seed(2)
    gate_up = (3 * torch.randn(20, 2 * 1536)).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    want = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    ops = cpu_rowwise(gate_up)
    out = ops.gated_activation(gate_up, gelu)
    assert out.shape == (20, 1536) and out.dtype == dtype
    assert torch.allclose(out.float(), want.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype]), (
        f"act(gate) * up off by {(out.float() - want.float()).abs().max():.3g} in {dtype}"
    )
    assert torch.equal(ops.gated_activation(gate_up[7:8], gelu)[0], out[7]), (
        "row 7 alone differs from row 7 of 20"
    )


def test_the_compiled_ops_step_aside_for_autograd_and_mixed_dtypes():
    x = torch.randn(4, 8)
    w = torch.ones(8, requires_grad=True)
    assert cpu_rowwise(x, w) is None, "a weight being trained needs PyTorch's backward"
    with torch.no_grad():
        assert cpu_rowwise(x, w) is not None
    assert cpu_rowwise(x, torch.ones(8, dtype=torch.bfloat16)) is None
