"""Batch-invariant numerics, bitwise: a token's logits do not depend on what shares its step.

Lossless speculative decoding needs this in every dtype: the verify step that checks γ drafts must
compute each position exactly as the autoregressive step would, and a sequence must decode the
same alone or inside a ragged batch of other sequences' prefill chunks, decodes and verifies.
"""

from __future__ import annotations

import pytest
import torch

from specray.kernels import cpu_attention
from specray.kernels.batch_invariance import invariant_rows
from specray.kernels.cpu_features import has_bf16
from specray.kernels.cpu_linear import uses_packed_gemm
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.models.loader import load_model

PROMPT_LENGTHS = (45, 70, 23, 130)
VERIFY = 5  # anchor + 4 drafts


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def target(request, smollm2):
    if cpu_attention.extension() is None:
        pytest.skip("no C++ compiler here: the PyTorch attention twin is not batch-invariant")
    if request.param == "float32":
        return smollm2
    if not has_bf16():
        pytest.skip("this CPU has no native bf16 (AMX or AVX-512 BF16); the engine runs fp32 here")
    return load_model("smollm2-135m", "bfloat16")


@pytest.fixture(scope="module")
def prompts(target):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, target.config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _runner(target, prompts, prefill_chunk: int | None = None) -> ModelRunner:
    """Every sequence's context, all but its last VERIFY tokens, in the cache (in chunks if asked)."""
    runner = ModelRunner(target.model, kv_cache_tokens=4096, block_size=16)
    for i, p in enumerate(prompts):
        context = p[:-VERIFY]
        step = prefill_chunk or len(context)
        for start in range(0, len(context), step):
            runner.run([ScheduledSequence(f"s{i}", context[start : start + step], 0)])
    return runner


def test_verify_rows_equal_autoregressive_rows(target, prompts):
    tail = prompts[0][-VERIFY:]
    verified = _runner(target, prompts).run([ScheduledSequence("s0", tail, VERIFY)]).logits[0]
    runner = _runner(target, prompts)
    stepwise = torch.stack([runner.run([ScheduledSequence("s0", [t], 1)]).logits[0][0] for t in tail])
    differing = [k for k in range(VERIFY) if not torch.equal(verified[k], stepwise[k])]
    assert not differing, f"verify rows {differing} differ from one-token decode steps"


def test_a_sequence_alone_equals_it_inside_a_ragged_batch(target, prompts):
    tails = [p[-VERIFY:] for p in prompts]
    alone = _runner(target, prompts).run([ScheduledSequence("s0", tails[0], VERIFY)]).logits[0]
    runner = _runner(target, prompts)
    # Around it: another sequence's verify, a one-token decode and a long prefill chunk.
    runner.run([ScheduledSequence("fresh", prompts[3][:60], 0)])
    batch = [
        ScheduledSequence("s1", tails[1], VERIFY),
        ScheduledSequence("fresh", prompts[3][60:110], 1),
        ScheduledSequence("s0", tails[0], VERIFY),
        ScheduledSequence("s2", tails[2][:1], 1),
    ]
    inside = runner.run(batch).logits[2]
    assert torch.equal(alone, inside), (
        f"logits alone vs in a ragged batch differ by {(alone - inside).abs().max().item():.3g}"
    )


def test_prefill_chunking_does_not_change_later_logits(target, prompts):
    tail = prompts[3][-VERIFY:]
    whole = _runner(target, prompts).run([ScheduledSequence("s3", tail, VERIFY)]).logits[0]
    chunked = _runner(target, prompts, prefill_chunk=7).run([ScheduledSequence("s3", tail, VERIFY)]).logits[0]
    assert torch.equal(whole, chunked), "prefilling in chunks of 7 changed the logits"


def test_linear_padding_rule_covers_small_batches():
    """Row counts the CPU GEMM treats differently are padded to one it treats like every other."""
    cpu = torch.device("cpu")
    bf16_rows = 1 if uses_packed_gemm(torch.bfloat16, cpu) else 2  # our packed GEMM needs no padding
    assert invariant_rows(1, torch.bfloat16, cpu) == bf16_rows and invariant_rows(7, torch.bfloat16, cpu) == 7
    assert [invariant_rows(n, torch.float32, cpu) for n in (1, 3, 4, 5, 9, 12, 13)] == [
        4,
        4,
        4,
        8,
        12,
        12,
        13,
    ]
    assert invariant_rows(1, torch.bfloat16, torch.device("meta")) == 1
