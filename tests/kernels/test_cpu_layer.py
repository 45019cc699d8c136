"""A Llama-style decoder layer as one C++ call (`kernels/cpu_layer.cpp`): the engine's logits are
bit-identical with and without it, over prefill, decode and ragged verify steps, with a sliding
window and a q/k/v bias too; layers it does not cover keep the module path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specray.kernels.cpu_linear import uses_packed_gemm
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.models.decoder import DecoderModel
from tests.tiny_models import make_tiny_target

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def packed_gemm():
    if not uses_packed_gemm(torch.bfloat16, CPU):
        pytest.skip("the fused layer runs only where bf16 linear layers run our packed GEMM")


def _steps(model: DecoderModel, fused: bool) -> list[torch.Tensor]:
    for layer in model.model.layers:
        layer.fused_on_cpu = fused
    runner = ModelRunner(model, 1024, 16)
    batches = [
        [ScheduledSequence("a", list(range(2, 90)), 1), ScheduledSequence("b", list(range(40, 57)), 2)],
        [ScheduledSequence("a", [5], 1)],
        [ScheduledSequence("a", [6, 7, 8, 9], 4), ScheduledSequence("b", [3], 1)],
        [ScheduledSequence("c", list(range(9, 30)), 3), ScheduledSequence("b", [11, 12], 2)],
    ]
    return [runner.run(batch).all_logits for batch in batches]


@pytest.mark.parametrize("variant", ["llama", "sliding-window", "qkv-bias"])
def test_the_fused_layer_gives_the_module_path_bits(variant):
    target = make_tiny_target(seed=3)
    config = target.config
    if variant == "sliding-window":
        config = dataclasses.replace(
            config, sliding_window=8, layer_types=("sliding_attention",) * config.num_layers
        )
    if variant == "qkv-bias":
        config = dataclasses.replace(config, attention_bias=True)
    torch.manual_seed(3)
    model = DecoderModel(config).to(torch.bfloat16).eval()
    model.load_state_dict(target.model.state_dict(), strict=False)
    assert all(layer.fused_on_cpu for layer in model.model.layers), "a Llama layer should take the fused path"
    with torch.inference_mode():
        modules, fused = _steps(model, False), _steps(model, True)
    for step, (want, got) in enumerate(zip(modules, fused)):
        assert torch.equal(want, got), (
            f"step {step}: the fused layer's logits differ from the modules' ({variant})"
        )


def test_layers_it_does_not_cover_keep_the_module_path():
    for family in ("qwen3", "gemma3"):  # q/k norms; Gemma's sandwich norms and (1 + w) weights too
        config = dataclasses.replace(make_tiny_target().config, family=family)
        layers = DecoderModel(config).model.layers
        assert not any(layer.fused_on_cpu for layer in layers), f"{family} layers need the module path"


def test_the_fused_layer_sees_weights_changed_after_its_first_call():
    """The fused layer keeps its packed arguments between steps: a weight changed in place, or a
    new parameter put in its place, must reach the next step as it reaches the module path."""
    target = make_tiny_target(seed=4)
    model = DecoderModel(target.config).to(torch.bfloat16).eval()
    model.load_state_dict(target.model.state_dict(), strict=False)
    layer = model.model.layers[0]
    with torch.inference_mode():
        _steps(model, True)
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(2)
        layer.input_layernorm.weight.add_(0.5)
    layer.self_attn.o_proj.weight = torch.nn.Parameter(-layer.self_attn.o_proj.weight.detach().clone())
    with torch.inference_mode():
        fused, modules = _steps(model, True), _steps(model, False)
    for step, (want, got) in enumerate(zip(modules, fused)):
        assert torch.equal(want, got), f"step {step}: the fused layer ran with stale weights"
