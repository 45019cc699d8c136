"""Confidence scheduling keeps sampling lossless, and its early stop is what does it.

DSpark Appendix A: a scheduler that looks past a non-improving candidate lets the sampled draft
decide whether it is verified, since c_{k+1} is computed from x_k; the output then drifts from the
target's distribution. Both cases are checked against the real acceptance kernel, then the engine
with the scheduler on is checked against a tiny model's exact output distribution (chi-square).
"""

from __future__ import annotations

import pytest
import torch
from distribution_check import assert_follows, exact_joint
from scipy.stats import chisquare
from tiny_models import tiny_hf_model

from specray.kernels.acceptance import accept_drafts
from specray.workers.engine.confidence_scheduler import confidence_budget, survival_order
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.drafter import Drafter, DraftProposal, DraftRequest
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.engine.step_curve import StepCurve
from specray.workers.models.loader import load_model

ALPHA = 1e-3  # a lossless scheduler fails a seeded fit with probability 0.1%

# ---- DSpark Appendix A ---------------------------------------------------------------------------
APPENDIX_CURVE = StepCurve((1, 2, 3), (1.0, 0.5, 0.45))
P_TARGET = torch.tensor([0.7, 0.3])
P_DRAFT = torch.tensor([0.5, 0.5])


def budget_without_early_stop(confidences: list[list[float]], curve: StepCurve) -> list[int]:
    """Algorithm 1 with the stop removed: the best of all prefixes of the survival order."""
    candidates = survival_order(confidences)
    lengths, best_lengths = [0] * len(confidences), [0] * len(confidences)
    batch, expected = len(confidences), float(len(confidences))
    best = expected * curve.sps(batch)
    for survival, j, r in candidates:
        batch, expected = batch + 1, expected + survival
        lengths[r] = j
        if expected * curve.sps(batch) > best:
            best, best_lengths = expected * curve.sps(batch), list(lengths)
    return best_lengths


def _first_tokens(schedule, trials: int = 4000) -> torch.Tensor:
    """First output token of `trials` verifications of two drafts from P_DRAFT, where c_1 = 0.8 and
    c_2 = 1 after draft token 0, 0 after token 1 (the confidence of x_2 is computed from x_1)."""
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(P_DRAFT, trials * 2, replacement=True, generator=g).view(trials, 2)
    lengths = [schedule([[0.8, 1.0 if int(x1) == 0 else 0.0]], APPENDIX_CURVE)[0] for x1 in drafts[:, 0]]
    num_accepted, emitted = accept_drafts(
        drafts,
        torch.tensor(lengths),
        P_TARGET.expand(trials, 3, 2).contiguous(),
        P_DRAFT.expand(trials, 2, 2).contiguous(),
        torch.zeros(trials, dtype=torch.bool),
        torch.rand(trials, 3, generator=g),
    )
    return emitted[:, 0]


def _fit(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    return float(chisquare(counts.numpy(), (probs.double() * counts.sum()).numpy()).pvalue)


def test_early_stop_keeps_the_appendix_a_case_lossless():
    first = _first_tokens(confidence_budget)
    assert _fit(first, P_TARGET) > ALPHA


def test_without_the_early_stop_the_output_is_biased():
    # The look-ahead verifies x_1 exactly when x_1 = 0 (then Θ = 2.6·0.45 > 1), so token 0 comes out
    # with probability 0.5 + 0.5·0.7 = 0.85 instead of 0.7.
    first = _first_tokens(budget_without_early_stop)
    assert _fit(first, P_TARGET) < 1e-9
    assert float((first == 0).double().mean()) == pytest.approx(0.85, abs=0.02)


# ---- the engine with the scheduler on ------------------------------------------------------------
VOCAB = 4
PROMPT = [1, 3, 0]
LENGTH = 3
NUM_SAMPLES = 3000
GAMMA = 3
# Step time 1 + B/256: with ~256 anchors a draft pays off while its survival beats ~τ*/(256 + B),
# so sure drafts get verified and unsure ones (and late positions, as τ* grows) are cut.
SCHEDULER_CURVE = StepCurve(tuple(range(1, 2049, 64)), tuple(256 / (256 + b) for b in range(1, 2049, 64)))


class TokenConfidenceDrafter(Drafter):
    """Samples drafts from fixed skewed distributions; c_k depends on the previous token (sure after
    an even token, unsure after an odd one), as a DSpark confidence head sees x_{k-1}."""

    name = "token-confidence"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        weights = torch.rand(GAMMA, VOCAB, generator=g) ** 3
        self.probs = weights / weights.sum(-1, keepdim=True)
        self.proposed = 0

    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        out = []
        for r in requests:
            k = min(r.max_tokens, GAMMA)
            tokens = [int(torch.multinomial(self.probs[i], 1, generator=r.generator)) for i in range(k)]
            previous = [r.token_ids[-1], *tokens[:-1]]
            confidence = [0.95 if p % 2 == 0 else 0.3 for p in previous]
            out.append(DraftProposal(tokens, self.probs[:k].clone(), confidence))
            self.proposed += k
        return out


def test_sampled_output_with_confidence_scheduling_follows_the_target(tmp_path):
    tiny_hf_model("llama", tmp_path, vocab_size=VOCAB, seed=4)
    target = load_model(str(tmp_path), "float32")
    params = SamplingParams(max_tokens=LENGTH, temperature=1.0, ignore_eos=True)
    drafter = TokenConfidenceDrafter()
    config = EngineConfig(
        num_speculative_tokens=GAMMA,
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        kv_cache_tokens=16384,
        scheduling="confidence",
        step_curve=SCHEDULER_CURVE,
    )
    seqs = LLMEngine(target, drafter, config).generate(
        [PROMPT] * NUM_SAMPLES, [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(NUM_SAMPLES)]
    )
    verified = sum(s.stats.draft_tokens for s in seqs)
    rejected = verified - sum(s.stats.accepted_tokens for s in seqs)
    # The scheduler cut drafts, kept others, and rejection sampling ran on what it kept.
    assert NUM_SAMPLES // 10 < verified < drafter.proposed - NUM_SAMPLES // 10
    assert rejected > NUM_SAMPLES // 10

    exact = exact_joint(target, PROMPT, params, LENGTH, VOCAB)
    counts = dict.fromkeys(exact, 0)
    for s in seqs:
        counts[tuple(s.output_ids)] += 1
    assert_follows(counts, exact, ALPHA, "scheduled samples")
