"""A DSpark block's forward and LM head as one C++ call (`kernels/cpu_draft_block.cpp`).

On CPUs where bf16 linear layers run our packed GEMM, a bf16 drafter drafts through `draft_block`:
slot inputs, RoPE, the injected layers over the cached context KV (a block sees its first
anchors[b] context rows and all of its own slots), the final norm and the head. It must compute
what the modules compute, within bf16 rounding of the fp32 module path, and give every block the
same bits whatever else is in the batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

from specray.kernels.cpu_linear import uses_packed_gemm
from specray.workers.drafters.checkpoint import build_model
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.draft_vocab import DraftVocab
from specray.workers.drafters.dspark import DSparkDrafter, DSparkModel
from tests.proposal_batches import LENGTHS, assert_batched_proposals_match_alone
from tests.tiny_models import make_tiny_target

CPU = torch.device("cpu")
BLOCK = 4
CONTEXT_LENS = [9, 3, 14]
WIDTH = 3
VOCAB = 40


@pytest.fixture(autouse=True)
def packed_gemm():
    if not uses_packed_gemm(torch.bfloat16, CPU):
        pytest.skip("the fused draft block runs only where bf16 linear layers run our packed GEMM")


def _model(target, state_input: bool) -> DSparkModel:  # noqa: ANN001
    torch.manual_seed(2)
    config = DrafterConfig.for_target(
        "dspark",
        target.config,
        3,
        mask_token_id=2,
        draft_block_size=BLOCK,
        num_layers=2,
        markov_rank=8,
        confidence=True,
        state_input=state_input,
        markov_tied=True,
        markov_candidates=6,
        draft_vocab_size=VOCAB,
    )
    model = build_model(config).eval()
    ids = torch.randperm(target.config.vocab_size, generator=torch.Generator().manual_seed(2))[:VOCAB]
    model.set_draft_vocab(DraftVocab(ids.sort().values, target.config.vocab_size))
    return model


def _inputs(model: DSparkModel, lens: list[int], seed: int) -> dict:
    """Block inputs of len(lens) blocks, with per-layer context KV [B, max(lens), ...] whose rows
    past a block's length are noise (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    d, kvh, hd, rows, width = c.hidden_size, c.num_kv_heads, c.head_dim, len(lens), max(lens)
    return {
        "context": [
            (torch.randn(rows, width, kvh, hd, generator=g), torch.randn(rows, width, kvh, hd, generator=g))
            for _ in model.layers
        ],
        "anchors": torch.tensor(lens),
        "anchor_embeds": torch.randn(rows, d, generator=g),
        "mask_embed": torch.randn(d, generator=g),
        "states": torch.randn(rows, d, generator=g),
    }


def _setup(state_input: bool, seed: int) -> tuple[DSparkModel, torch.nn.Linear, dict]:
    """A drafter over a tiny target, its output head and one batch of block inputs."""
    target = make_tiny_target(seed=4)
    model = _model(target, state_input)
    inputs = _inputs(model, CONTEXT_LENS, seed=seed)
    if not state_input:
        inputs["states"] = None
    return model, model.output_layer(target.model), inputs


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    cast = {
        k: v.to(dtype) if k not in ("context", "anchors") and v is not None else v for k, v in inputs.items()
    }
    cast["context"] = [(k.to(dtype), v.to(dtype)) for k, v in inputs["context"]]
    return cast


def _modules(model: DSparkModel, head: torch.nn.Linear, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the Python modules in fp32."""
    model, head = copy.deepcopy(model).float(), copy.deepcopy(head).float()
    with torch.inference_mode():
        hidden = model.blocks(**_cast(inputs, torch.float32))[:, :WIDTH]
        return hidden, head(hidden)


def _fused(model: DSparkModel, head: torch.nn.Linear, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model, head = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(head).to(torch.bfloat16)
    with torch.inference_mode():
        hidden, logits = model.fused_block_logits(
            **_cast(inputs, torch.bfloat16), head=head, width=WIDTH, softcap=0.0
        )
    return hidden.float(), logits


@pytest.mark.parametrize("state_input", [True, False], ids=["state-input", "plain"])
def test_the_fused_block_computes_what_the_modules_compute(state_input) -> None:  # noqa: ANN001
    model, head, inputs = _setup(state_input, seed=0)
    for name, want, got in zip(
        ("hidden", "logits"), _modules(model, head, inputs), _fused(model, head, inputs)
    ):
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, modules give {tuple(want.shape)}"
        error, scale = (got - want).abs().max().item(), want.abs().max().item()
        assert error <= 0.03 * scale, (
            f"{name}: fused bf16 is {error:.4f} from fp32 modules (scale {scale:.2f})"
        )


def test_a_block_gets_the_same_bits_alone_and_in_a_batch() -> None:
    model, head, inputs = _setup(True, seed=1)
    together = _fused(model, head, inputs)
    for b, length in enumerate(CONTEXT_LENS):
        alone_inputs = {k: v[b : b + 1] for k, v in inputs.items() if k not in ("context", "mask_embed")}
        alone_inputs["mask_embed"] = inputs["mask_embed"]
        alone_inputs["context"] = [
            (k[b : b + 1, :length], v[b : b + 1, :length]) for k, v in inputs["context"]
        ]
        alone = _fused(model, head, alone_inputs)
        for name, batched, single in zip(("hidden", "logits"), together, alone):
            assert torch.equal(batched[b], single[0]), f"block {b}: its {name} change with the batch"


def test_context_rows_past_a_blocks_length_are_not_seen() -> None:
    model, head, inputs = _setup(True, seed=2)
    before = _fused(model, head, inputs)
    scrambled = []
    for k, v in inputs["context"]:
        k, v = k.clone(), v.clone()
        for b, length in enumerate(CONTEXT_LENS):
            k[b, length:] = 1e3
            v[b, length:] = -1e3
        scrambled.append((k, v))
    after = _fused(model, head, {**inputs, "context": scrambled})
    assert all(torch.equal(x, y) for x, y in zip(before, after)), (
        "a block reads context rows beyond its length"
    )


def test_bf16_proposals_take_the_fused_block_and_match_alone_and_batched(monkeypatch) -> None:  # noqa: ANN001
    """The whole bf16 drafting path (context KV projected as [k | v] in one GEMM, H_ctx at anchor−1
    read from the context cache, the fused block, the Markov sampler): a sequence's drafts, draft
    probabilities and confidences do not depend on what else is in the proposal."""
    target = make_tiny_target(seed=4)
    target.model.to(torch.bfloat16)
    model = _model(target, True)
    # Each drafter its own copy: a drafter casts its model to bf16 after reading its fp32 tables.
    batched, single = DSparkDrafter(copy.deepcopy(model), target.model), DSparkDrafter(model, target.model)
    calls = []
    fused = DSparkModel.fused_block_logits
    monkeypatch.setattr(DSparkModel, "fused_block_logits", lambda *a, **k: calls.append(1) or fused(*a, **k))
    assert_batched_proposals_match_alone(batched, single, [7, 7, 7], [0.0, 1.0, 0.7], 3 * 32)
    assert len(calls) == 2 * (1 + len(LENGTHS)), f"bf16 proposals took the fused block {len(calls)} times"


def test_the_fused_context_rows_are_the_modules_and_do_not_depend_on_the_batch() -> None:
    """`draft_context` (fc, context norm, each layer's [k | v] with RoPE) against the fp32 modules,
    and each row's bits the same when projected alone."""
    target = make_tiny_target(seed=4)
    model = _model(target, True)
    g = torch.Generator().manual_seed(3)
    features, positions = torch.randn(5, 3 * 32, generator=g), torch.tensor([0, 1, 2, 7, 30])
    reference = copy.deepcopy(model).float()
    fused_model = copy.deepcopy(model).to(torch.bfloat16)
    with torch.inference_mode():
        want_fused = reference.fuse(features)
        want = [want_fused, *[t for kv in reference.context_kv(want_fused, positions) for t in kv]]
        got_fused, got_kv = fused_model.fused_context_kv(features.to(torch.bfloat16), positions)
        got = [got_fused, *[t for kv in got_kv for t in kv]]
        rows = [
            fused_model.fused_context_kv(features[i : i + 1].to(torch.bfloat16), positions[i : i + 1])
            for i in range(5)
        ]
    names = ["H_ctx"] + [f"layer {i // 2} {'kv'[i % 2]}" for i in range(2 * len(model.layers))]
    for name, w, x in zip(names, want, got):
        error, scale = (x.float() - w).abs().max().item(), w.abs().max().item()
        assert error <= 0.03 * scale, (
            f"{name}: fused bf16 is {error:.4f} from fp32 modules (scale {scale:.2f})"
        )
    for i, (fused, kv) in enumerate(rows):
        alone = [fused, *[t for pair in kv for t in pair]]
        for name, together, single in zip(names, got, alone):
            assert torch.equal(together[i], single[0]), f"row {i}: its {name} changes with the other rows"
