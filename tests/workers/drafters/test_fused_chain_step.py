"""An EAGLE-3 chain step as one C++ call (`draft_chain_step`, `kernels/cpu_draft_block.cpp`).

On CPUs where bf16 linear layers run our packed GEMM, a bf16 EAGLE-3 drafter runs each chain step
as one call: the step's input projection, its layer over the context and the earlier steps (whose
KV it appends to a copy of the context), the final norm and the head. It must compute what the
modules' chain computes, within bf16 rounding of the fp32 modules, leave the cached context as it
was, and give every sequence the same drafts whatever else is in the proposal.
"""

from __future__ import annotations

import copy

import pytest
import torch

from specray.kernels.cpu_linear import uses_packed_gemm
from specray.workers.drafters.checkpoint import build_model
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.draft_vocab import DraftVocab
from specray.workers.drafters.eagle3 import Eagle3Drafter, Eagle3Model
from tests.proposal_batches import assert_batched_proposals_match_alone
from tests.tiny_models import make_tiny_target

CONTEXT_LENS = [9, 3, 14]
STEPS = 4
VOCAB = 40


@pytest.fixture(autouse=True)
def packed_gemm():
    if not uses_packed_gemm(torch.bfloat16, torch.device("cpu")):
        pytest.skip("the fused chain step runs only where bf16 linear layers run our packed GEMM")


def _model(target) -> Eagle3Model:  # noqa: ANN001
    torch.manual_seed(2)
    config = DrafterConfig.for_target(
        "eagle3", target.config, 3, mask_token_id=2, draft_block_size=7, draft_vocab_size=VOCAB
    )
    model = build_model(config).eval()
    ids = torch.randperm(target.config.vocab_size, generator=torch.Generator().manual_seed(2))[:VOCAB]
    model.set_draft_vocab(DraftVocab(ids.sort().values, target.config.vocab_size))
    return model


def _drafter(model: Eagle3Model, dtype: torch.dtype) -> Eagle3Drafter:
    target = make_tiny_target(seed=4)
    target.model.to(dtype)
    return Eagle3Drafter(copy.deepcopy(model), target.model)


def test_fused_chain_steps_compute_what_the_module_chain_computes() -> None:
    """Four steps, each reading its own previous output, over contexts of different lengths whose
    padding rows are noise: the fused bf16 chain against the fp32 modules' chain."""
    model = _model(make_tiny_target(seed=4))
    reference, fused = _drafter(model, torch.float32), _drafter(model, torch.bfloat16)
    assert fused.fused and not reference.fused, "the bf16 drafter should take the fused chain"
    g = torch.Generator().manual_seed(0)
    c = model.config
    rows, longest = len(CONTEXT_LENS), max(CONTEXT_LENS)
    context = [tuple(torch.randn(rows, longest, c.num_kv_heads, c.head_dim, generator=g) for _ in "kv")]
    anchors = torch.tensor(CONTEXT_LENS) + 1  # the first step sits at anchor−1 and sees the rows before it
    embeds = torch.randn(rows, STEPS, c.hidden_size, generator=g)
    first_state = torch.randn(rows, c.hidden_size, generator=g)
    bf16_context = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in context]
    untouched = [t.clone() for t in bf16_context[0]]
    with torch.inference_mode():
        want_step = reference.module_chain(context, anchors)
        got_step = fused.fused_chain(bf16_context[0], anchors)
        want_state, got_state = first_state, first_state.to(torch.bfloat16)
        for j in range(STEPS):
            want_state, want_logits = want_step(embeds[:, j], want_state)
            got_state, got_logits = got_step(embeds[:, j].to(torch.bfloat16), got_state)
            for name, want, got in (("output", want_state, got_state), ("logits", want_logits, got_logits)):
                assert got.shape == want.shape, (
                    f"step {j} {name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
                )
                error, scale = (got.float() - want).abs().max().item(), want.abs().max().item()
                assert error <= 0.05 * scale, (
                    f"step {j} {name}: fused bf16 is {error:.4f} from the fp32 modules (scale {scale:.2f})"
                )
    for name, before, after in zip("kv", untouched, bf16_context[0]):
        assert torch.equal(before, after), f"the fused chain wrote its steps into the cached context {name}"


def test_bf16_proposals_take_the_fused_chain_and_match_alone_and_batched(monkeypatch) -> None:  # noqa: ANN001
    """The whole bf16 drafting path: a sequence's drafts and draft probabilities do not depend on
    what else is in the proposal, and every step is one fused call."""
    model = _model(make_tiny_target(seed=4))
    batched, single = _drafter(model, torch.bfloat16), _drafter(model, torch.bfloat16)
    calls = []
    bind = Eagle3Model.fused_chain_step

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        step = bind(*args, **kwargs)
        return lambda *a: calls.append(1) or step(*a)

    monkeypatch.setattr(Eagle3Model, "fused_chain_step", counted)
    limits = [7, 3, 5]
    assert_batched_proposals_match_alone(batched, single, limits, [0.0, 1.0, 0.7], 3 * 32)
    want_calls = 2 * (max(limits) + sum(limits))
    assert len(calls) == want_calls, f"bf16 proposals took {len(calls)} fused steps, want {want_calls}"
