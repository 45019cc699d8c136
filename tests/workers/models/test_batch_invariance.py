"""Batch-invariant numerics, bitwise: a token's logits do not depend on what shares its step.

Lossless speculative decoding needs this in every dtype: the verify step that checks γ drafts must
compute each position exactly as the autoregressive step would, and a sequence must decode the
same alone or inside a ragged batch of other sequences' prefill chunks, decodes and verifies.
"""

from __future__ import annotations

import pytest
import torch

from specray.kernels import cpu_attention
from specray.kernels.batch_invariance import ONEDNN_ROW_BLOCKS
from specray.kernels.cpu_features import has_bf16
from specray.kernels.cpu_linear import linear
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


def test_a_verify_alone_equals_it_among_more_rows_than_one_gemm_block(target, prompts):
    """Eight verifies put 40 rows through the LM head: more than oneDNN computes in one invariant
    block (`batch_invariance.ONEDNN_ROW_BLOCKS`), which once changed a row's bits on AMX."""
    tails = [p[-VERIFY:] for p in prompts]
    alone = _runner(target, prompts).run([ScheduledSequence("s0", tails[0], VERIFY)]).logits[0]
    runner = _runner(target, prompts + prompts)
    batch = [ScheduledSequence(f"s{i}", tails[i % len(tails)], VERIFY) for i in range(2 * len(prompts))]
    crowded = runner.run(batch).logits[0]
    assert torch.equal(alone, crowded), (
        f"verify logits alone vs among 40 rows differ by {(alone - crowded).abs().max().item():.3g}"
    )


def test_prefill_chunking_does_not_change_later_logits(target, prompts):
    tail = prompts[3][-VERIFY:]
    whole = _runner(target, prompts).run([ScheduledSequence("s3", tail, VERIFY)]).logits[0]
    chunked = _runner(target, prompts, prefill_chunk=7).run([ScheduledSequence("s3", tail, VERIFY)]).logits[0]
    assert torch.equal(whole, chunked), "prefilling in chunks of 7 changed the logits"


def test_onednn_row_blocks_stay_within_the_shared_kernels():
    """Every call oneDNN gets has a row count in the class all batch sizes share: fp32 4, 8 or 12
    rows, bf16 2 to 32 (never the one-row GEMV), and together they cover the padded rows."""
    fp32, bf16 = ONEDNN_ROW_BLOCKS[torch.float32], ONEDNN_ROW_BLOCKS[torch.bfloat16]
    for rows in range(1, 130):
        for blocks, allowed in ((fp32, {4, 8, 12}), (bf16, set(range(2, 33)))):
            padded = blocks.padded(rows)
            sizes = blocks.sizes(padded)
            assert padded >= rows and sum(sizes) == padded, f"{blocks}: {rows} rows → {sizes}"
            assert set(sizes) <= allowed, f"{blocks}: {rows} rows called as {sizes}"
    assert bf16.sizes(33) == [31, 2], "a lone 33rd bf16 row must not run as a GEMV"


def test_linear_rows_have_the_same_bits_in_every_batch():
    """`kernels.linear` on the CPU: each row equals that row alone, in fp32 and bf16, for the
    LM head's shape and a small layer, at row counts on both sides of every block limit."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for k, n in ((576, 49152), (576, 192)):
            layer = torch.nn.Linear(k, n, bias=False).to(dtype).requires_grad_(False)
            x = torch.randn(80, k).to(dtype)
            with torch.inference_mode():
                alone = torch.cat([linear(x[i : i + 1], layer) for i in range(80)])
                for rows in (2, 3, 5, 12, 13, 16, 32, 33, 57, 80):
                    assert torch.equal(linear(x[:rows], layer), alone[:rows]), (
                        f"{dtype} [{k}→{n}]: a batch of {rows} rows changed a row's bits"
                    )


def test_autocast_linear_is_one_call(monkeypatch):
    """Row blocks are for inference: under bf16 autocast (training, where each call recasts the
    weight — 29 ms for the LM head) `kernels.linear` makes one `F.linear` call for all rows."""
    import specray.kernels.cpu_linear as cpu_linear

    calls = []
    real = cpu_linear.F.linear
    monkeypatch.setattr(cpu_linear.F, "linear", lambda *args: calls.append(args[0].shape[0]) or real(*args))
    layer = torch.nn.Linear(64, 96, bias=False).requires_grad_(False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(torch.randn(40, 64), layer)
    assert calls == [40], f"autocast linear of 40 rows made calls of {calls} rows"
    assert out.dtype == torch.bfloat16, "autocast linear must compute in bf16"
