"""Batch-wide verification: every row is verified exactly as it would be alone.

Penalties, temperature, top-k and top-p run over the whole batch with per-row parameters, greedy
rows take the argmax path and sampled rows the rejection-sampling path, so these pin down that no
row's parameters, drafts or random draws leak into another's: a batch of mixed requests gives each
row the verdict (accepted drafts, emitted tokens, logprobs) it gets when verified on its own.
"""

from __future__ import annotations

import torch

from specray.workers.engine.drafter import DraftProposal
from specray.workers.engine.sampling import (
    SamplingParams,
    SamplingRows,
    apply_batch_penalties,
    apply_penalties,
    processed_logits,
)
from specray.workers.engine.sequence import Sequence
from specray.workers.engine.verification import verify_drafts

VOCAB = 40
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.4}
ROWS = [
    # (params, number of drafts, drafts carry probabilities)
    (SamplingParams(), 4, False),
    (SamplingParams(logprobs=3, **PENALTIES), 3, False),
    (SamplingParams(temperature=1.0, seed=1), 4, True),
    (SamplingParams(temperature=0.7, top_k=6, top_p=0.8, seed=2, logprobs=0), 2, True),
    (SamplingParams(temperature=1.3, seed=3, logprobs=2, **PENALTIES), 4, True),
    (SamplingParams(temperature=0.9, seed=4), 3, False),  # one-hot p_d beside rows with p_d
    (SamplingParams(temperature=1.0, top_p=0.5, seed=5), 0, False),  # autoregressive row
    (SamplingParams(top_k=3), 0, False),  # greedy ignores top-k
]


def _case(seed: int = 0) -> tuple[list[Sequence], list[DraftProposal], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seqs, proposals, logits = [], [], []
    for i, (params, k, with_probs) in enumerate(ROWS):
        rows = torch.randn(k + 1, VOCAB, generator=g) * 3
        probs = torch.softmax(torch.randn(k, VOCAB, generator=g) * 2, dim=-1)
        # Greedy rows draft the argmax for a while, so some drafts pass and some fail.
        drafts = rows[:k].argmax(-1) if params.greedy else torch.multinomial(probs, 1, generator=g).squeeze(1)
        if params.greedy and k > 2:
            drafts[2] = (drafts[2] + 1) % VOCAB
        output = torch.randint(VOCAB, (5,), generator=g).tolist()
        seqs.append(Sequence(f"s{i}", [1, 2, 3, 2], params, params.generator(), output))
        proposals.append(DraftProposal(drafts.tolist(), probs if with_probs else None))
        logits.append(rows)
    return seqs, proposals, torch.cat(logits)


def _fresh(seqs: list[Sequence]) -> list[Sequence]:
    """The same sequences with their random streams back at their seeds."""
    return [Sequence(s.seq_id, s.prompt_ids, s.params, s.params.generator(), s.output_ids) for s in seqs]


def test_a_row_is_verified_alike_alone_and_in_a_mixed_batch():
    seqs, proposals, logits = _case()
    batched = verify_drafts(_fresh(seqs), proposals, logits)
    start = 0
    for i, (seq, proposal) in enumerate(zip(seqs, proposals)):
        rows = logits[start : start + len(proposal.tokens) + 1]
        start += len(rows)
        (alone,) = verify_drafts(_fresh([seq]), [proposal], rows)
        assert batched[i] == alone, f"row {i} ({seq.params}) verified differently inside the batch"
    accepted = [v.num_accepted for v in batched]
    assert any(accepted) and any(a < len(p.tokens) for a, p in zip(accepted, proposals)), accepted
    assert all(len(v.emitted) == v.num_accepted + 1 for v in batched)
    assert [v.logprobs is not None for v in batched] == [s.params.logprobs is not None for s in seqs]


def test_greedy_rows_emit_the_target_argmax():
    seqs, proposals, logits = _case(seed=1)
    penalized = apply_batch_penalties(
        logits,
        [s.params for s in seqs],
        [s.prompt_ids for s in seqs],
        [s.output_ids for s in seqs],
        [p.tokens for p in proposals],
        [len(p.tokens) + 1 for p in proposals],
    )
    start = 0
    for seq, proposal, verdict in zip(seqs, proposals, verify_drafts(_fresh(seqs), proposals, logits)):
        argmax = penalized[start : start + len(proposal.tokens) + 1].argmax(-1).tolist()
        start += len(proposal.tokens) + 1
        if seq.params.greedy:
            n = verdict.num_accepted
            assert verdict.emitted == argmax[: n + 1], "a greedy row must emit the (penalized) argmax"
            assert n == len(proposal.tokens) or proposal.tokens[n] != argmax[n]


def test_sampling_parameters_apply_per_row():
    params = [r[0] for r in ROWS]
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(len(params) * 2, VOCAB, generator=g) * 3
    got = processed_logits(logits, SamplingRows.of(params, [2] * len(params), VOCAB, logits.device))
    for i, p in enumerate(params):
        for row in (2 * i, 2 * i + 1):
            expected = _plain_processed(logits[row], p)
            assert torch.equal(got[row], expected), f"row {row}: {p} processed differently in the batch"


def _plain_processed(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p over one row, written out plainly."""
    if p.greedy:
        return logits.float()
    logits = logits.float() / p.temperature
    if 0 < p.top_k < len(logits):
        logits = torch.where(logits < logits.topk(p.top_k).values[-1], float("-inf"), logits)
    if p.top_p < 1.0:
        probs = logits.softmax(-1)
        order = probs.argsort(descending=True, stable=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        drop = torch.zeros(len(logits), dtype=torch.bool)
        drop[order[mass_before >= p.top_p]] = True
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def test_batch_penalties_equal_each_sequence_alone():
    seqs, proposals, logits = _case(seed=3)
    num_rows = [len(p.tokens) + 1 for p in proposals]
    got = apply_batch_penalties(
        logits,
        [s.params for s in seqs],
        [s.prompt_ids for s in seqs],
        [s.output_ids for s in seqs],
        [p.tokens for p in proposals],
        num_rows,
    )
    start = 0
    for seq, proposal, n in zip(seqs, proposals, num_rows):
        rows = logits[start : start + n]
        alone = apply_penalties(rows, seq.params, seq.prompt_ids, seq.output_ids, proposal.tokens)
        assert torch.equal(got[start : start + n], alone), f"{seq.seq_id}: penalties differ in the batch"
        if not seq.params.has_penalties:
            assert torch.equal(alone, rows), "rows without penalties stay as they were"
        start += n
