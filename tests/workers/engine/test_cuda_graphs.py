"""Decode and verify steps padded to static shapes (the inputs of a CUDA graph) compute exactly what
the unpadded forward computes, and their padding never touches a real sequence's KV cache.

On the CPU the padded step runs eagerly through the same buffers a graph would read; bitwise equality
needs the batch-invariant CPU attention kernel. With CUDA, the captured graphs are replayed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from specray.kernels import cpu_attention
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.cuda_graphs import StaticStepConfig, StepShape, padded_batch_sizes
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.engine.sampling import SamplingParams

GAMMA = 4
PROMPTS = [list(range(3, 3 + n)) for n in (9, 23, 4)]
FEATURE_LAYERS = (1, 4)


def test_padded_batch_sizes_cover_every_batch_up_to_the_largest():
    assert padded_batch_sizes(256) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    assert padded_batch_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert padded_batch_sizes(1) == (1,)
    for max_batch in (3, 50, 100):
        sizes = padded_batch_sizes(max_batch)
        assert sizes[-1] == max_batch and list(sizes) == sorted(set(sizes))


def _model(target, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A copy of the shared tiny target's model, in this dtype and on this device."""
    return copy.deepcopy(target.model).to(device=device, dtype=dtype)


def _runners(model, capture: bool) -> tuple[ModelRunner, ModelRunner]:
    """An unpadded runner and a padded one (shapes up to 4 rows of 1 or γ+1 tokens), both holding
    the same prefilled prompts."""
    plain = ModelRunner(model, kv_cache_tokens=512, block_size=4, feature_layers=FEATURE_LAYERS)
    config = StaticStepConfig(query_lens=(1, GAMMA + 1), max_batch=4, capture=capture)
    padded = ModelRunner(
        model, kv_cache_tokens=512, block_size=4, feature_layers=FEATURE_LAYERS, static_steps=config
    )
    for runner in (plain, padded):
        runner.run([ScheduledSequence(f"s{i}", p, 1) for i, p in enumerate(PROMPTS)])
    return plain, padded


# Steps after the prefill: (sequence, new tokens) per row, then how many of them each row keeps
# (a verify rolls back its rejected drafts).
STEPS = [
    ([("s0", [5]), ("s1", [6]), ("s2", [7])], [1, 1, 1]),  # decode, 3 rows padded to 4
    ([("s0", [8, 9, 10, 11, 12]), ("s1", [13, 14]), ("s2", [15, 16, 17])], [2, 2, 1]),  # ragged verify
    ([("s1", [18])], [1]),  # one row
    ([("s2", [19, 20]), ("s0", [21, 22, 23, 24, 25])], [2, 5]),  # two rows padded to 2, reordered
    ([("s0", [26]), ("s1", [27]), ("s2", [28])], [1, 1, 1]),
]


def _assert_steps_agree(plain: ModelRunner, padded: ModelRunner, exact: bool) -> None:
    for number, (rows, keep) in enumerate(STEPS):
        batch = [ScheduledSequence(seq, tokens, len(tokens)) for seq, tokens in rows]
        shape = padded.static_steps.shape_for(
            [len(t) for _, t in rows], [len(t) for _, t in rows], [padded.kv.length(seq) for seq, _ in rows]
        )
        assert shape is not None, f"step {number} should run padded"
        want, got = plain.run(batch), padded.run(batch)
        for name in ("all_logits",):
            a, b = getattr(want, name), getattr(got, name)
            if exact:
                assert torch.equal(a, b), f"step {number}: padded logits differ by {(a - b).abs().max():.3g}"
            else:
                torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=f"step {number}: logits")
                assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {number}: argmax differs"
        for a, b in zip(want.features, got.features):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-4), f"step {number}: features"
        for runner in (plain, padded):
            for (seq, tokens), n in zip(rows, keep):
                runner.rollback(seq, runner.kv.length(seq) - len(tokens) + n)
    # Padding wrote only the scratch block: every real block holds what the unpadded runs wrote.
    blocks = plain.kv.num_blocks
    for layer, ((k0, v0), (k1, v1)) in enumerate(zip(plain.kv.layers, padded.kv.layers)):
        assert torch.equal(k0, k1[:blocks]) and torch.equal(v0, v1[:blocks]), (
            f"layer {layer}: KV cache differs"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padded_steps_equal_unpadded_steps_bitwise_on_cpu(tiny_target, dtype):
    if cpu_attention.extension() is None:
        pytest.skip("no C++ compiler here: the PyTorch attention twin is not batch-invariant")
    _assert_steps_agree(*_runners(_model(tiny_target, dtype), capture=False), exact=True)


def test_which_steps_run_padded(tiny_target):
    _, padded = _runners(tiny_target.model, capture=False)
    steps = padded.static_steps
    assert steps.shape_for([1, 1, 1], [1, 1, 1], [9, 23, 4]) == StepShape(4, 1)
    assert steps.shape_for([5, 2, 3], [5, 2, 3], [9, 23, 4]) == StepShape(4, GAMMA + 1)
    assert steps.shape_for([2], [2], [9]) == StepShape(1, GAMMA + 1)
    assert steps.shape_for([6], [6], [9]) is None, "more tokens than a verify shape holds"
    assert steps.shape_for([4, 1], [1, 1], [0, 9]) is None, "a prefill chunk runs unpadded"
    assert steps.shape_for([1] * 5, [1] * 5, [9] * 5) is None, "more rows than the largest shape"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replayed_graphs_match_unpadded_steps_on_cuda(tiny_target):
    pytest.importorskip("triton", reason="graphs run the Triton attention kernel")
    # The GPU's kernels are not batch-invariant: padded rows may round differently, never pick another token.
    _assert_steps_agree(*_runners(_model(tiny_target, device="cuda"), capture=True), exact=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_engine_with_graphs_decodes_as_without_on_cuda(tiny_target):
    pytest.importorskip("triton", reason="graphs run the Triton attention kernel")
    target = copy.copy(tiny_target)
    target.model = _model(tiny_target, device="cuda")
    prompts = [[1] + list(range(3, 3 + n)) for n in (1, 5, 17, 2, 30, 9)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outputs = []
    for graphs in (False, True):
        config = EngineConfig(num_speculative_tokens=0, max_num_seqs=4, cuda_graphs=graphs)
        engine = LLMEngine(target, None, config)
        assert (engine.scheduler.runner.static_steps is not None) == graphs
        outputs.append([s.output_ids for s in engine.generate(prompts, params)])
    assert outputs[0] == outputs[1]
