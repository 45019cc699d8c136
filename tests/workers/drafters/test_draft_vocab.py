"""Draft vocabularies: which tokens they keep, the target↔draft id map, the checkpoint round trip,
and exact sampled losslessness when the drafter can propose only part of the target's vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from distribution_check import assert_follows, exact_joint

from specray.workers.drafters.checkpoint import (
    build_model,
    load_drafter,
    load_drafter_model,
    save_drafter_model,
)
from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.draft_vocab import DraftVocab, count_tokens, coverage, select_draft_vocab
from specray.workers.drafters.dspark import DSparkDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.drafter import DraftRequest
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.loader import LoadedModel

DSPARK = {"markov_rank": 8, "confidence": True, "state_input": True, "markov_tied": True}


def test_selection_ranks_stop_tokens_then_responses_then_prompts_then_ids() -> None:
    response = torch.tensor([0, 5, 0, 9, 0, 0, 2, 0])
    prompt = torch.tensor([0, 0, 7, 0, 0, 3, 0, 0])
    vocab = select_draft_vocab(response, prompt, 5, always=[7])
    # 7 (stop), then 3, 1, 6 by response count, then 2 by prompt count.
    assert vocab.ids.tolist() == [1, 2, 3, 6, 7]
    # Room past the data goes to the lowest unseen ids.
    assert select_draft_vocab(response, prompt, 7).ids.tolist() == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="size"):
        select_draft_vocab(response, prompt, 1, always=[0, 7])


def test_count_tokens_splits_responses_from_prompts() -> None:
    samples = [(torch.tensor([4, 4, 2, 1]), torch.tensor([False, False, True, True]))]
    response, prompt = count_tokens(samples * 2, 6)
    assert response.tolist() == [0, 2, 2, 0, 0, 0] and prompt.tolist() == [0, 0, 0, 0, 4, 0]


def test_ids_map_between_target_and_draft() -> None:
    vocab = DraftVocab(torch.tensor([2, 5, 6, 11]), 12)
    tokens = torch.tensor([[5, 0, 11], [2, 6, 7]])
    columns = vocab.to_draft(tokens)
    assert columns.tolist() == [[1, -1, 3], [0, 2, -1]]
    inside = columns >= 0
    assert torch.equal(vocab.to_target(columns[inside]), tokens[inside])
    assert torch.equal(vocab.to_draft(vocab.to_target(torch.arange(4))), torch.arange(4))
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    full = vocab.scatter(probs)
    assert full.shape == (12,) and torch.equal(full[vocab.ids], probs) and full.sum() == probs.sum()
    assert coverage(vocab, tokens) == pytest.approx(4 / 6)
    for ids in ([3, 2], [1, 12], [-1, 4]):
        with pytest.raises(ValueError):
            DraftVocab(torch.tensor(ids), 12)


def _dspark_with_vocab(
    target: LoadedModel, ids: list[int], seed: int = 1, candidates: int = 0
) -> DSparkDrafter:
    torch.manual_seed(seed)
    config = DrafterConfig.for_target(
        "dspark",
        target.config,
        3,
        mask_token_id=2,
        draft_vocab_size=len(ids),
        markov_candidates=candidates,
        **DSPARK,
    )
    model = build_model(config).eval()
    with torch.no_grad():  # a non-zero Markov output so the reduced W2 is exercised
        model.markov_out.weight.normal_()
    model.set_draft_vocab(DraftVocab(torch.tensor(ids), target.config.vocab_size))
    return DSparkDrafter(model, target.model)


def test_checkpoint_keeps_the_map(tiny_target, tmp_path) -> None:  # noqa: ANN001
    ids = [1, 4, 9, 17, 33, 40, 60, 95]
    drafter = _dspark_with_vocab(tiny_target, ids)
    save_drafter_model(drafter.model, tmp_path / "d")
    loaded = load_drafter_model(tmp_path / "d")
    assert loaded.config.draft_vocab_size == len(ids)
    assert loaded.draft_ids.dtype == torch.long and loaded.draft_ids.tolist() == ids, "map lost on save"
    served = load_drafter(tmp_path / "d", tiny_target)
    assert served.token_ids.tolist() == ids
    assert torch.equal(served.head.weight, tiny_target.model.lm_head.weight[ids]), (
        "LM head rows not the map's"
    )


def test_a_checkpoint_without_a_map_drafts_over_the_whole_vocabulary(tiny_target, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    config = DrafterConfig.for_target("dspark", tiny_target.config, 3, mask_token_id=2, **DSPARK)
    save_drafter_model(build_model(config), tmp_path / "old")
    # A checkpoint written before draft vocabularies existed has no such field.
    fields = json.loads((tmp_path / "old" / "config.json").read_text())
    del fields["draft_vocab_size"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(fields))
    drafter = load_drafter(tmp_path / "old", tiny_target)
    assert drafter.vocab is None and drafter.token_ids is None
    assert drafter.head is tiny_target.model.lm_head, "a full-vocabulary drafter must share the LM head"


def test_the_bundled_drafter_proposes_from_its_draft_vocabulary() -> None:
    """The bundled drafter ships its 8k-token map: ascending target ids, the stop tokens in."""
    model = load_drafter_model("smollm2-135m-dspark")
    vocab = model.draft_vocab()
    assert vocab is not None and vocab.size == model.config.output_vocab_size == 8192
    assert vocab.target_vocab_size == model.config.vocab_size
    assert bool((vocab.to_draft(torch.tensor([0, 2])) >= 0).all()), "a stop token (0, 2) is outside the map"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafts_stay_inside_the_vocabulary_and_p_d_is_zero_outside(tiny_target, temperature) -> None:  # noqa: ANN001
    ids = list(range(3, 96, 4))
    drafter = _dspark_with_vocab(tiny_target, ids)
    features = torch.randn(19, 3 * 32)
    tokens = torch.randint(3, 96, (20,)).tolist()
    drafter.observe("s", features, 0)
    params = SamplingParams(max_tokens=50, temperature=temperature)
    for seed in range(5):
        proposal = drafter.propose(
            [DraftRequest("s", tokens, 7, params, torch.Generator().manual_seed(seed))]
        )[0]
        assert set(proposal.tokens) <= set(ids), f"drafted {proposal.tokens} outside the draft vocabulary"
        if temperature == 0.0:
            assert proposal.probs is None
            continue
        outside = torch.ones(96, dtype=torch.bool)
        outside[ids] = False
        assert proposal.probs.shape == (7, 96) and bool((proposal.probs[:, outside] == 0).all())
        torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(7))


# ---- exact sampled losslessness over a reduced vocabulary -------------------------------------------
VOCAB = 8
PROMPT = [1, 3, 5]
# The prefill emits the first token; a feature drafter drafts from the second on, one draft before
# the bonus token.
LENGTH = 3
NUM_SAMPLES = 3000
ALPHA = 1e-3  # a lossless engine fails this seeded test with probability 0.1%


def test_sampled_output_follows_the_target_with_a_reduced_vocabulary(small_vocab_target) -> None:  # noqa: ANN001
    """Half the target's tokens can never be drafted: where the target puts mass on them, only the
    residual max(0, p_t − p_d) can emit them, and the output must still be the target's distribution.
    Each slot also samples among its 3 best columns of the 4 only (Markov candidates), so which
    tokens a draft can be changes from step to step."""
    target = small_vocab_target
    params = SamplingParams(max_tokens=LENGTH, temperature=1.0, ignore_eos=True)
    drafter = _dspark_with_vocab(target, [0, 2, 5, 6], candidates=3)
    engine = LLMEngine(
        target,
        drafter,
        EngineConfig(
            num_speculative_tokens=3, max_num_seqs=256, max_num_batched_tokens=2048, kv_cache_tokens=16384
        ),
    )
    seqs = engine.generate(
        [PROMPT] * NUM_SAMPLES, [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(NUM_SAMPLES)]
    )
    drafted = sum(s.stats.draft_tokens for s in seqs)
    accepted = sum(s.stats.accepted_tokens for s in seqs)
    assert accepted > NUM_SAMPLES // 10, "too few drafts accepted to exercise acceptance"
    assert drafted - accepted > NUM_SAMPLES // 10, "too few drafts rejected to exercise the residual"
    exact = exact_joint(target, PROMPT, params, LENGTH, VOCAB)
    outside = [o for o in exact if o[1] in (1, 3, 4, 7)]  # the drafted position
    assert sum(exact[o] for o in outside) > 0.2, "the target rarely emits undraftable tokens: a weak test"
    counts = dict.fromkeys(exact, 0)
    for s in seqs:
        counts[tuple(s.output_ids)] += 1
    assert_follows(counts, exact, ALPHA, "speculative samples over a reduced draft vocabulary")
