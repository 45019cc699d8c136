"""The Markov sampler's candidate loop in C++ (`kernels/cpu_markov.cpp`) draws what its PyTorch twin
(`markov_sampling.sample_markov_block` with `candidates`) draws: the same tokens from the same
uniforms, the same distributions and confidences to float rounding, with or without a draft
vocabulary, confidence head, or returned distributions; and `kernels.sample_markov_block` takes it
on the CPU."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import markov_inputs

from specray import kernels
from specray.kernels import cpu_attention, cpu_markov, markov_sampling

VOCAB, RANK, D_MODEL, CANDIDATES = 300, 40, 24, 17


@pytest.fixture
def ext():
    compiled = cpu_attention.extension()
    if compiled is None:
        pytest.skip("no C++ compiler here: the PyTorch twin samples the candidates")
    return compiled


def _vocabulary_case(seed: int) -> dict:
    """A draft vocabulary of 120 columns over the 300-token vocabulary (W1 stays by token id)."""
    args = markov_inputs(8, 5, VOCAB, RANK, D_MODEL, torch.float32, seed)
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:120].sort().values
    args["logits"] = args["logits"][..., ids].contiguous()
    args["w2"] = args["w2"][ids].contiguous()
    args["token_ids"] = ids
    return args


@pytest.mark.parametrize("case", ["full", "draft-vocabulary", "no-confidence"])
@pytest.mark.parametrize("return_probs", [True, False])
def test_the_compiled_loop_draws_what_the_twin_draws(ext, case: str, return_probs: bool) -> None:  # noqa: ANN001
    for seed in range(4):
        if case == "draft-vocabulary":
            args = _vocabulary_case(seed)
        else:
            args = markov_inputs(8, 5, VOCAB, RANK, D_MODEL, torch.float32, seed, with_conf=case == "full")
        twin = markov_sampling.sample_markov_block(**args, return_probs=return_probs, candidates=CANDIDATES)
        ours = cpu_markov.sample_candidates(
            ext, **{"hidden": None, "conf_weight": None, "conf_bias": 0.0, "conf_temperature": None,
                    "conf_shift": None, "token_ids": None, **args},
            return_probs=return_probs, candidates=CANDIDATES,
        )  # fmt: skip
        assert torch.equal(ours.tokens, twin.tokens), f"{case}, seed {seed}: other tokens drawn"
        torch.testing.assert_close(ours.token_probs, twin.token_probs, rtol=1e-5, atol=1e-7)
        if return_probs:
            torch.testing.assert_close(ours.probs, twin.probs, rtol=1e-5, atol=1e-7)
        else:
            assert ours.probs is None, "distributions returned although not asked for"
        if case == "no-confidence":
            assert ours.confidence is None, "a confidence without a confidence head"
        else:
            torch.testing.assert_close(ours.confidence, twin.confidence, rtol=1e-5, atol=1e-7)


def test_the_cpu_dispatch_takes_the_compiled_loop(ext, monkeypatch) -> None:  # noqa: ANN001
    """`kernels.sample_markov_block` with candidates on the CPU runs the C++ loop (not the twin)."""
    called = []
    original = ext.markov_candidates_block

    class Spy:
        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(ext, name)

        def markov_candidates_block(self, *a):  # noqa: ANN002, ANN202
            called.append(True)
            return original(*a)

    monkeypatch.setattr(cpu_attention, "extension", lambda: Spy())
    args = markov_inputs(4, 3, VOCAB, RANK, D_MODEL, torch.float32, 11)
    draft = kernels.sample_markov_block(**args, return_probs=True, candidates=CANDIDATES)
    assert called, "the CPU path did not call the compiled candidate loop"
    twin = markov_sampling.sample_markov_block(**args, return_probs=True, candidates=CANDIDATES)
    assert torch.equal(draft.tokens, twin.tokens)
