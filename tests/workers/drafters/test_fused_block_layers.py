"""A drafter block's layers as one C++ call each (`kernels/cpu_layer.cpp`, `injected_layer`).

On CPUs where bf16 linear layers run our packed GEMM, inference runs each injected layer as one
call over a pool of single-row KV pages. It must compute what the modules compute (a block sees
its first context_lens[b] context rows and all of its own slots), within bf16 rounding of the
fp32 module path, and give every block the same bits whatever else is in the batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

from specray.kernels.cpu_linear import uses_packed_gemm
from specray.workers.drafters.checkpoint import build_model
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.draft_vocab import DraftVocab
from specray.workers.drafters.dspark import DSparkDrafter
from specray.workers.drafters.layers import InjectedLayer
from specray.workers.engine.drafter import DraftRequest
from specray.workers.engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_target

CPU = torch.device("cpu")
BLOCK = 4
CONTEXT_LENS = [9, 3, 14]


@pytest.fixture(autouse=True)
def packed_gemm():
    if not uses_packed_gemm(torch.bfloat16, CPU):
        pytest.skip("the fused block layers run only where bf16 linear layers run our packed GEMM")


def _backbone(target):  # noqa: ANN001, ANN202
    torch.manual_seed(2)
    config = DrafterConfig.for_target(
        "dspark", target.config, 3, mask_token_id=2, draft_block_size=BLOCK, num_layers=2
    )
    return build_model(config).eval()


def _inputs(model, lens: list[int], seed: int):  # noqa: ANN001, ANN202
    """Block inputs [B, T, d], slot positions, per-layer context KV [B, max(lens), ...] whose rows
    past a block's length are garbage (they must not matter), and the lengths."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    d, kvh, hd, rows, width = c.hidden_size, c.num_kv_heads, c.head_dim, len(lens), max(lens)
    x = torch.randn(rows, BLOCK, d, generator=g)
    context = [
        (torch.randn(rows, width, kvh, hd, generator=g), torch.randn(rows, width, kvh, hd, generator=g))
        for _ in model.layers
    ]
    anchors = torch.tensor(lens)
    positions = anchors.unsqueeze(1) + torch.arange(BLOCK)
    return x, positions, context, anchors


def _run(model, x, positions, context, anchors, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
    model.to(dtype)
    cast = [(k.to(dtype), v.to(dtype)) for k, v in context]
    with torch.inference_mode():
        return model.run_block_layers(x.to(dtype), positions, cast, anchors).float()


def test_the_fused_layers_compute_what_the_modules_compute(tiny_target, monkeypatch) -> None:  # noqa: ANN001
    model = _backbone(tiny_target)
    inputs = _inputs(model, CONTEXT_LENS, seed=0)
    want = _run(model, *inputs, torch.float32)
    calls = []
    fused = InjectedLayer.fused_block_forward
    monkeypatch.setattr(InjectedLayer, "fused_block_forward", lambda *a: calls.append(1) or fused(*a))
    got = _run(model, *inputs, torch.bfloat16)
    assert len(calls) == len(model.layers), (
        f"bf16 inference took the fused path {len(calls)} times, not per layer"
    )
    error = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= 0.03 * scale, f"fused bf16 layers are {error:.4f} from fp32 modules (scale {scale:.2f})"


def test_a_block_gets_the_same_bits_alone_and_in_a_batch(tiny_target) -> None:  # noqa: ANN001
    model = _backbone(tiny_target)
    x, positions, context, anchors = _inputs(model, CONTEXT_LENS, seed=1)
    together = _run(model, x, positions, context, anchors, torch.bfloat16)
    for b, length in enumerate(CONTEXT_LENS):
        alone_context = [(k[b : b + 1, :length], v[b : b + 1, :length]) for k, v in context]
        alone = _run(
            model, x[b : b + 1], positions[b : b + 1], alone_context, anchors[b : b + 1], torch.bfloat16
        )
        assert torch.equal(together[b], alone[0]), f"block {b}: its layer outputs change with the batch"


def test_context_rows_past_a_blocks_length_are_not_seen(tiny_target) -> None:  # noqa: ANN001
    model = _backbone(tiny_target)
    x, positions, context, anchors = _inputs(model, CONTEXT_LENS, seed=2)
    before = _run(model, x, positions, context, anchors, torch.bfloat16)
    scrambled = []
    for k, v in context:
        k, v = k.clone(), v.clone()
        for b, length in enumerate(CONTEXT_LENS):
            k[b, length:] = 1e3
            v[b, length:] = -1e3
        scrambled.append((k, v))
    after = _run(model, x, positions, scrambled, anchors, torch.bfloat16)
    assert torch.equal(before, after), "a block's output depends on context rows beyond its length"


def test_bf16_proposals_are_the_same_alone_and_in_a_batch() -> None:
    """The whole bf16 drafting path (context KV projected as [k | v] in one GEMM, H_ctx at anchor−1
    read from the context cache, fused block layers, Markov sampler): a sequence's drafts, draft
    probabilities and confidences do not depend on what else is in the proposal."""
    target = make_tiny_target(seed=4)
    target.model.to(torch.bfloat16)
    torch.manual_seed(4)
    config = DrafterConfig.for_target(
        "dspark",
        target.config,
        3,
        mask_token_id=2,
        num_layers=2,
        markov_rank=8,
        confidence=True,
        state_input=True,
        markov_tied=True,
        markov_candidates=6,
        draft_vocab_size=40,
    )
    model = build_model(config).eval()
    model.set_draft_vocab(
        DraftVocab(torch.randperm(target.config.vocab_size)[:40].sort().values, target.config.vocab_size)
    )
    # Each drafter its own copy: a drafter casts its model to bf16 after reading its fp32 tables.
    batched, single = DSparkDrafter(copy.deepcopy(model), target.model), DSparkDrafter(model, target.model)
    g = torch.Generator().manual_seed(0)
    lengths, temperatures = [9, 14, 20], [0.0, 1.0, 0.7]
    ids = [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]
    for i, n in enumerate(lengths):
        features = torch.randn(n - 1, 3 * 32, generator=g)
        batched.observe(f"s{i}", features, 0)
        single.observe(f"s{i}", features, 0)

    def requests() -> list[DraftRequest]:
        return [
            DraftRequest(
                f"s{i}",
                ids[i],
                7,
                SamplingParams(max_tokens=50, temperature=t),
                torch.Generator().manual_seed(i),
            )
            for i, t in enumerate(temperatures)
        ]

    for _ in range(2):  # the second proposal reads the KV and states the first one cached
        together = batched.propose(requests())
        alone = [single.propose([r])[0] for r in requests()]
        for i, (a, b) in enumerate(zip(together, alone)):
            assert a.tokens == b.tokens, f"row {i}: batched drafts {a.tokens}, alone {b.tokens}"
            assert a.confidence == b.confidence, f"row {i}: confidences change with the batch"
            assert (a.probs is None) == (b.probs is None)
            assert a.probs is None or torch.equal(a.probs, b.probs), f"row {i}: draft probabilities change"
