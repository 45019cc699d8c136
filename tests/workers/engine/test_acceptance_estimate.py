"""The acceptance estimate of confidence-less drafts: conditional per position, starting at the
prior, following what the verify steps observe, and what Algorithm 1 then admits."""

from __future__ import annotations

import pytest

from specray.workers.engine.acceptance_estimate import PRIOR_WEIGHT, AcceptanceEstimate
from specray.workers.engine.scheduling_policy import ConfidenceScheduling
from specray.workers.engine.step_curve import StepCurve


def test_starts_at_the_prior_and_counts_each_position_given_the_earlier_ones():
    estimate = AcceptanceEstimate(0.5)
    assert estimate.confidences(3) == [0.5, 0.5, 0.5]
    estimate.record(3, 1)  # draft 1 kept, draft 2 rejected: draft 3 was never reached
    estimate.record(2, 2)
    estimate.record(1, 0)
    c1, c2, c3 = estimate.confidences(3)
    w = PRIOR_WEIGHT
    # (Older steps fade by 0.5 % per observation: nearly plain counts here.)
    assert c1 == pytest.approx((2 + 0.5 * w) / (3 + w), rel=0.01), "position 1: 2 kept of 3 verified"
    assert c2 == pytest.approx((1 + 0.5 * w) / (2 + w), rel=0.01), "position 2: 1 kept of the 2 reached"
    assert c3 == 0.5, "position 3 was never reached after an accepted draft 2"
    with pytest.raises(ValueError):
        estimate.record(1, 2)
    with pytest.raises(ValueError):
        AcceptanceEstimate(1.2)


def test_evidence_outweighs_the_prior_and_follows_a_change():
    estimate = AcceptanceEstimate(0.6)
    for _ in range(300):
        estimate.record(2, 0)
    assert estimate.confidences(1)[0] < 0.05, "always rejected, yet still near the prior"
    for _ in range(600):
        estimate.record(2, 2)
    assert estimate.confidences(1)[0] > 0.9, "older rejections did not fade"


def test_algorithm_1_admits_ngram_drafts_by_their_observed_acceptance():
    # One request alone on a gentle curve: a draft pays when its survival beats the slow-down.
    curve = StepCurve((1, 2, 8), (10.0, 8.0, 6.0))
    policy = ConfidenceScheduling(curve, prior=0.6)
    assert policy.budgets([3], [None]) == [3], "the prior's 0.6 per draft pays on this curve"
    for _ in range(200):
        policy.record(3, 0)  # the n-gram drafts keep failing
    assert policy.budgets([3], [None]) == [0], "drafts that are never accepted are still verified"
    assert policy.budgets([3], [[0.9, 0.9, 0.9]]) == [3], "drafter confidences are taken as given"
