"""Masks and information flow of the drafters: what each slot may and may not see."""

from __future__ import annotations

import pytest
import torch

from specray.workers.drafters.config import DrafterConfig, spread_feature_layers
from specray.workers.drafters.context_cache import ContextCache, Projection
from specray.workers.drafters.dspark import DSparkModel, block_mask
from specray.workers.drafters.eagle3 import Eagle3Model, chain_mask


def _dspark(tiny_target, **kwargs) -> DSparkModel:  # noqa: ANN001
    torch.manual_seed(0)
    config = DrafterConfig.for_target("dspark", tiny_target.config, 3, mask_token_id=2, **kwargs)
    model = DSparkModel(config).eval()
    with torch.no_grad():  # a non-zero W2 so the Markov path is exercised
        (model.markov_out if config.markov_tied else model.markov_w2).weight.normal_()
    return model


def _one_sequence(model, features, ids, anchors, target):  # noqa: ANN001, ANN202
    """`training_outputs` of one sequence: row 0 of a batch of one."""
    logits, confidence = model.training_outputs(features[None], ids[None], anchors[None], target)
    return logits[0], None if confidence is None else confidence[0]


# (state_input, markov_tied): the bare and state-input block inputs, free and embedding-tied tables.
VARIANTS = [(False, False), (True, False), (True, True)]


def test_feature_layers_follow_the_dspark_rule() -> None:
    assert spread_feature_layers(30, 5) == (1, 8, 14, 20, 27)
    assert max(spread_feature_layers(30, 3)) < 29


def test_block_mask_sees_only_earlier_context_and_own_block() -> None:
    mask = block_mask(torch.tensor([3, 7]), context_len=10, draft_block_size=3)
    assert mask.shape == (6, 16)
    for row in range(6):
        block, anchor = divmod(row, 3)[0], (3, 7)[row // 3]
        assert mask[row, :10].tolist() == [j < anchor for j in range(10)]
        assert mask[row, 10:].tolist() == [j // 3 == block for j in range(6)]


def test_chain_mask_is_causal_within_chain() -> None:
    mask = chain_mask(torch.tensor([4]), context_len=6, steps=3)
    assert mask[:, :6].tolist() == [[j < 3 for j in range(6)]] * 3
    assert mask[:, 6:].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("state_input", [False, True])
def test_block_never_sees_later_context_or_other_blocks(tiny_target, state_input) -> None:  # noqa: ANN001
    model = _dspark(tiny_target, markov_rank=8, confidence=True, state_input=state_input)
    features = torch.randn(30, 3 * 32)
    ids = torch.randint(3, 96, (30,))
    anchors = torch.tensor([5, 12, 20])
    logits, _ = _one_sequence(model, features, ids, anchors, tiny_target.model)
    later = features.clone()
    later[12:] += torch.randn_like(later[12:])  # context at or after anchor 12
    other = ids.clone()
    other[20] = (other[20] + 1) % 96  # block 2's anchor token
    for f, i in ((later, ids), (features, other)):
        changed, _ = _one_sequence(model, f, i, anchors, tiny_target.model)
        assert torch.allclose(changed[0], logits[0], atol=1e-5)
    changed, _ = _one_sequence(model, later, ids, anchors, tiny_target.model)
    assert torch.allclose(changed[1], logits[1], atol=1e-5) and not torch.allclose(changed[2], logits[2])


@pytest.mark.parametrize("state_input,markov_tied", VARIANTS)
def test_markov_bias_and_confidence_depend_only_on_previous_token(
    tiny_target, state_input, markov_tied
) -> None:  # noqa: ANN001
    model = _dspark(
        tiny_target, markov_rank=8, confidence=True, state_input=state_input, markov_tied=markov_tied
    )
    features = torch.randn(30, 3 * 32)
    ids = torch.randint(3, 96, (30,))
    anchors = torch.tensor([10])
    logits, conf = _one_sequence(model, features, ids, anchors, tiny_target.model)
    # ids[anchor + 3] is x_2 (slot 2's label) and x_{k−1} for slot 3.
    edited = ids.clone()
    edited[13] = (edited[13] + 7) % 96
    new_logits, new_conf = _one_sequence(model, features, edited, anchors, tiny_target.model)
    differs = [not torch.allclose(new_logits[0, k], logits[0, k]) for k in range(7)]
    assert differs == [k == 3 for k in range(7)]
    conf_differs = [not torch.isclose(new_conf[0, k], conf[0, k]) for k in range(7)]
    assert conf_differs == [k == 3 for k in range(7)]  # slot 2 never sees its own token x_2


def test_eagle3_chain_uses_only_earlier_steps(tiny_target) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = Eagle3Model(DrafterConfig.for_target("eagle3", tiny_target.config, 3)).eval()
    features = torch.randn(30, 3 * 32)
    ids = torch.randint(3, 96, (30,))
    logits, _ = _one_sequence(model, features, ids, torch.tensor([10]), tiny_target.model)
    edited = ids.clone()
    edited[13] = (edited[13] + 7) % 96  # the teacher-forced input of step 3
    new_logits, _ = _one_sequence(model, features, edited, torch.tensor([10]), tiny_target.model)
    differs = [not torch.allclose(new_logits[0, k], logits[0, k]) for k in range(7)]
    assert differs == [k >= 3 for k in range(7)]


def test_context_cache_crops_rejected_positions() -> None:
    cache = ContextCache()
    calls = []

    def project(features: torch.Tensor, positions: torch.Tensor, owners: torch.Tensor) -> list:
        calls.append((positions.tolist(), owners.tolist()))
        return Projection([(features[:, None, :2].clone(), features[:, None, 2:4].clone())])

    cache.observe("s", torch.arange(24.0).view(6, 4), 0)
    assert cache.context_kv(["s"], [5], project)[0][0].shape == (1, 5, 1, 2)
    cache.observe("s", torch.full((2, 4), -1.0), 3)  # positions 3.. were rejected and replaced
    kv = cache.context_kv(["s"], [5], project)
    assert calls == [([0, 1, 2, 3, 4], [0] * 5), ([3, 4], [0, 0])]
    assert kv[0][0][0, :3, 0].tolist() == [[0, 1], [4, 5], [8, 9]] and (kv[0][0][0, 3:] == -1).all()


def test_context_cache_projects_a_batch_at_once_and_pads() -> None:
    """Every sequence's missing positions go through one projection call; the batch comes back
    zero-padded to the longest context."""
    cache = ContextCache()
    calls = []

    def project(features: torch.Tensor, positions: torch.Tensor, owners: torch.Tensor) -> list:
        calls.append((positions.tolist(), owners.tolist()))
        return Projection(
            [(features[:, None, :1].clone(), features[:, None, 1:2].clone())], features[:, 1] * 10
        )

    cache.observe("a", torch.arange(8.0).view(4, 2), 0)
    cache.observe("b", torch.arange(100.0, 112.0).view(6, 2), 0)
    cache.context_kv(["a"], [2], project)
    kv = cache.context_kv(["b", "a"], [5, 3], project)
    assert calls == [([0, 1], [0, 0]), ([0, 1, 2, 3, 4, 2], [0, 0, 0, 0, 0, 1])]
    keys = kv[0][0][..., 0, 0]
    assert keys.tolist() == [[100, 102, 104, 106, 108], [0, 2, 4, 0, 0]]
    # The projector's state rows are kept beside the KV and read back per position.
    assert cache.states_at(["a", "b"], [2, 4]).tolist() == [50, 1090], "state rows not kept per position"
    assert cache.states_at(["b"], [0]).tolist() == [1010]
    with pytest.raises(ValueError, match="no projected state"):
        cache.states_at(["a"], [3])


def test_a_shorter_draft_is_a_prefix_of_the_full_block(tiny_target) -> None:  # noqa: ANN001
    from specray.workers.drafters.dspark import DSparkDrafter
    from specray.workers.engine.drafter import DraftRequest
    from specray.workers.engine.sampling import SamplingParams

    drafter = DSparkDrafter(_dspark(tiny_target, markov_rank=8, confidence=True), tiny_target.model)
    ids = torch.randint(3, 96, (20,)).tolist()
    drafter.observe("s", torch.randn(19, 3 * 32), 0)
    params = SamplingParams(max_tokens=50, temperature=1.0)

    def propose(limit: int):  # noqa: ANN202
        request = DraftRequest("s", ids, limit, params, torch.Generator().manual_seed(3))
        return drafter.propose([request])[0]

    full = propose(7)
    for limit in (1, 3):
        short = propose(limit)
        assert short.tokens == full.tokens[:limit]
        assert torch.equal(short.probs, full.probs[:limit])
        # The confidence head's matmul may round differently over a narrower block.
        assert short.confidence == pytest.approx(full.confidence[:limit], abs=1e-6)


def test_state_input_reads_the_last_context_state(tiny_target) -> None:  # noqa: ANN001
    model = _dspark(tiny_target, markov_rank=8, confidence=True, state_input=True)
    features = torch.randn(30, 3 * 32)
    ids = torch.randint(3, 96, (30,))
    anchors = torch.tensor([12])
    logits, _ = _one_sequence(model, features, ids, anchors, tiny_target.model)
    # Remove attention's path to the context: only the state input can still carry position 11.
    for layer in model.layers:
        torch.nn.init.zeros_(layer.self_attn.v_proj.weight)
    no_attention, _ = _one_sequence(model, features, ids, anchors, tiny_target.model)
    edited = features.clone()
    edited[11] += torch.randn(3 * 32)
    changed, _ = _one_sequence(model, edited, ids, anchors, tiny_target.model)
    assert not torch.allclose(changed, no_attention), "slots ignore H_ctx at anchor−1"
    edited = features.clone()
    edited[10] += torch.randn(3 * 32)
    changed, _ = _one_sequence(model, edited, ids, anchors, tiny_target.model)
    assert torch.allclose(changed, no_attention, atol=1e-5), (
        "the state input reads a position other than anchor−1"
    )
    assert not torch.allclose(logits, no_attention)


@pytest.mark.parametrize("state_input,markov_tied", VARIANTS)
def test_greedy_draft_is_the_training_argmax(tiny_target, state_input, markov_tied) -> None:  # noqa: ANN001
    """Inference (cached context, slot-by-slot Markov sampling) drafts what the training forward scores."""
    from specray.workers.drafters.dspark import DSparkDrafter
    from specray.workers.engine.drafter import DraftRequest
    from specray.workers.engine.sampling import SamplingParams

    model = _dspark(
        tiny_target, markov_rank=8, confidence=True, state_input=state_input, markov_tied=markov_tied
    )
    drafter = DSparkDrafter(model, tiny_target.model)
    features = torch.randn(20, 3 * 32)
    ids = torch.randint(3, 96, (20,))
    drafter.observe("s", features[:15], 0)
    request = DraftRequest("s", ids[:16].tolist(), 7, SamplingParams(max_tokens=50), torch.Generator())
    drafted = drafter.propose([request])[0].tokens
    # Teacher-force the drafted tokens: slot k's previous token is then the draft x_{k−1}.
    forced = torch.cat((ids[:16], torch.tensor(drafted)))
    logits, _ = _one_sequence(
        model, torch.cat((features, torch.randn(3, 3 * 32))), forced, torch.tensor([15]), tiny_target.model
    )
    assert logits[0].argmax(-1).tolist() == drafted


def test_tied_markov_tables_give_the_training_bias(tiny_target) -> None:  # noqa: ANN001
    """The sampler's materialised [V, r] tables reproduce the factored head for every previous token."""
    model = _dspark(tiny_target, markov_rank=8, confidence=True, markov_tied=True)
    w1, w2 = model.markov_tables(tiny_target.model)
    vocab = torch.arange(tiny_target.config.vocab_size)
    with torch.no_grad():
        code = model.markov_code(vocab, tiny_target.model)
        bias = model.markov_bias(code, tiny_target.model)
    assert w1.shape == w2.shape == (tiny_target.config.vocab_size, 8)
    assert torch.allclose(w1, code, atol=1e-6), "W1 table differs from the embedding-tied code"
    assert torch.allclose(w1 @ w2.T, bias, rtol=1e-4, atol=1e-3), "W2·W1 tables differ from the training bias"
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("markov")) < 3 * 32 * 8, (
        "a tied Markov head should hold O(d·r) parameters, not a V×r table"
    )
