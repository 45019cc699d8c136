"""Sequential Platt scaling: recovers a known miscalibration, in scale or in offset, and lowers ECE."""

from __future__ import annotations

import torch

from specray.training.calibrate import (
    auc,
    cross_validated_errors,
    expected_calibration_error,
    fit_calibration,
    ngram_acceptance,
)
from specray.training.objective import block_labels, choose_anchors
from specray.workers.drafters.ngram import NgramDrafter


def _true_logits_and_acceptance(blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated logits and the prefix acceptance drawn from them: slot k accepted with σ(logit_k)."""
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(blocks, block_size, generator=gen) * 1.5
    accept = (torch.rand(blocks, block_size, generator=gen) < torch.sigmoid(true_logits)).float()
    return true_logits, accept.cumprod(dim=1)


def test_temperature_scaling_fixes_overconfidence() -> None:
    true_logits, accept = _true_logits_and_acceptance(4000, 4)
    overconfident = true_logits * 3.0  # the head's logits are 3× too sharp
    temperatures, shifts, report = fit_calibration(overconfident, accept, num_bins=10)
    assert abs(temperatures[0] - 3.0) < 0.6, (
        f"position 1: T = {temperatures[0]:.2f}, the head is 3× too sharp"
    )
    assert abs(shifts[0]) < 0.3, f"position 1: shift {shifts[0]:.2f} for a head off in scale only"
    assert all(after < before for before, after in zip(report["ece_before"], report["ece_after"])), (
        f"calibration did not lower the ECE everywhere: {report['ece_before']} → {report['ece_after']}"
    )


def test_a_per_position_shift_fixes_a_shifted_head_where_temperature_cannot() -> None:
    true_logits, accept = _true_logits_and_acceptance(10000, 3)
    shifted = true_logits.clone()
    shifted[:, 1] += 2.0  # position 2's head is off by a constant: overconfident at every logit
    _, _, temperature_only = fit_calibration(shifted, accept, num_bins=10, shift_range=(0.0, 0.0))
    assert temperature_only["ece_after"][1] > 0.03, (
        f"temperature alone reached ECE {temperature_only['ece_after'][1]:.3f} at position 2: "
        "this head no longer needs a shift to calibrate"
    )
    temperatures, shifts, report = fit_calibration(shifted, accept, num_bins=10)
    assert abs(shifts[1] + 2.0) < 0.4 and 0.8 < temperatures[1] < 1.25, (
        f"position 2: T = {temperatures[1]:.2f}, b = {shifts[1]:.2f}, for a head shifted by +2"
    )
    assert max(report["ece_after"]) < 0.02, f"ECE after Platt scaling {report['ece_after']}, not below 2%"


def test_the_out_of_sample_ece_is_not_flattered_by_the_fit() -> None:
    # 120 blocks of a calibrated head: the grid search fits their noise, so in-sample ECE is low;
    # scored on sequences it was not fitted on, the same calibration does worse.
    true_logits, accept = _true_logits_and_acceptance(120, 4)
    sequence = torch.arange(120) // 4  # 30 sequences of 4 blocks
    _, _, report = fit_calibration(true_logits, accept, num_bins=10)
    out_of_sample = cross_validated_errors(true_logits, accept, sequence, folds=2, num_bins=10)
    assert sum(out_of_sample) > 1.5 * sum(report["ece_after"]), (
        f"out-of-sample ECE {out_of_sample} is no worse than in-sample {report['ece_after']}: "
        "the folds were scored by fits that saw them"
    )
    # With 10k blocks a fit on half the sequences calibrates the other half.
    true_logits, accept = _true_logits_and_acceptance(10000, 3)
    out_of_sample = cross_validated_errors(
        true_logits, accept, torch.arange(10000) // 8, folds=2, num_bins=10
    )
    assert max(out_of_sample) < 0.02, f"out-of-sample ECE {out_of_sample} of a calibrated head, not below 2%"


def test_too_few_sequences_for_the_folds_give_no_out_of_sample_ece() -> None:
    true_logits, accept = _true_logits_and_acceptance(40, 3)
    one_sequence = torch.zeros(40, dtype=torch.long)
    assert cross_validated_errors(true_logits, accept, one_sequence, folds=2, num_bins=10) is None


def test_ece_and_auc_basics() -> None:
    pred = torch.tensor([0.1, 0.1, 0.9, 0.9])
    assert expected_calibration_error(pred, torch.tensor([0.0, 0.0, 1.0, 1.0]), 10) < 0.11
    assert auc(pred + torch.tensor([0, 0.01, 0, 0.01]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == 1.0
    assert auc(pred, torch.ones(4)) is None


def test_supervision_stops_at_the_first_unsupervised_slot() -> None:
    ids = torch.arange(12)
    mask = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    anchors = choose_anchors(mask, 100, torch.Generator().manual_seed(0))
    assert anchors.tolist() == [2, 3, 4, 6, 7, 8, 9, 10]
    labels, supervised, target_pos = block_labels(ids, mask, torch.tensor([2, 9]), 4)
    assert supervised.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert labels[0].tolist() == [3, 4, 5, 6] and target_pos[0].tolist() == [2, 3, 4, 5]


def test_ngram_acceptance_scores_the_lookup_draft_at_each_anchor_against_the_text() -> None:
    ids = [5, 1, 2, 3, 7, 1, 2, 3, 8]
    # Anchor 6 (token 2): the suffix [1, 2] occurred at 1, so n = 2 proposes [3, 7, 1]; the text
    # goes on 3, 8: position 1 accepted, position 2 reached and rejected, position 3 not reached.
    # Anchor 3 (token 3): no earlier 3, no match, nothing counted.
    rates, counts = ngram_acceptance([(ids, [3, 6])], NgramDrafter(max_ngram=4), block_size=3)
    assert counts[1] == [[1, 1], [0, 1], [0, 0]], "the counts after a 2-token match"
    assert all(row == [[0, 0]] * 3 for n, row in enumerate(counts) if n != 1), "other lengths counted"
    assert rates[1] == [2 / 3, 1 / 3, 1 / 2], "the rates are the counts under a Beta(1, 1) prior"
