"""`specray train calibrate`: sequential Platt scaling of the DSpark confidence head.

On held-out cached data, each block's drafts are scored teacher-forced (slot k's previous token is
the true one, as at inference when the earlier drafts were accepted) and verification at T = 1 is
simulated: draft k survives with probability 1 − ½‖p_d − p_t‖₁, drawn with a fixed seed; the
observed prefix acceptance at k is the product of those draws up to k. Then, for k = 1..γ in
order, a temperature T_k and a shift b_k, c_k = σ(logit_k / T_k + b_k), are grid-searched to
minimise the ECE of the cumulative product Π_{i≤k} c_i, the earlier positions held fixed.

The fit and its ECE use the same blocks, so that ECE flatters it. The report also gives the ECE out
of sample: the sequences are split into folds, each fold is scored by a calibration fitted on the
others, and the ECE is taken over all the folds' blocks (a sequence's blocks stay in one fold).

At the same anchors it measures n-gram lookup: how often an n-gram draft's k-th token matches the
text, given the earlier ones did, per suffix-match length n — the prior a hybrid over this drafter
starts each request from (workers/drafters/hybrid.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specray.training.objective import choose_anchors, teacher_forced_blocks
from specray.training.online_features import open_features
from specray.workers.drafters.checkpoint import load_drafter_model, resolve_drafter_path
from specray.workers.drafters.hybrid import count_outcome
from specray.workers.drafters.kinds import DrafterModel, trained_kind
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.models.loader import LoadedModel, load_model


@dataclass(frozen=True)
class CalibrateConfig:
    drafter: Path
    cache_dir: Path = Path(".scratch/train/cache")  # or a `train data` directory (features online)
    split: str = "valid"
    anchors_per_sequence: int = 64
    num_bins: int = 10
    folds: int = 2  # for the out-of-sample ECE
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.anchors_per_sequence < 1 or self.num_bins < 2 or self.folds < 2:
            raise ValueError("need anchors_per_sequence >= 1, num_bins >= 2 and folds >= 2")


def calibration_errors(preds: torch.Tensor, observed: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Equal-width-bin ECE of each row of `preds` [G, n] against `observed` [n]:
    Σ_b |b|/n · |mean(pred_b) − mean(observed_b)| = Σ_b |Σ_{i∈b} (pred_i − observed_i)| / n.
    Rows at once, so a search scores a whole grid of candidate calibrations in one pass."""
    bins = (preds * num_bins).long().clamp(max=num_bins - 1)
    gaps = torch.zeros(preds.shape[0], num_bins, dtype=torch.float64)
    gaps.scatter_add_(1, bins, (preds - observed).double())
    return gaps.abs().sum(dim=1) / preds.shape[1]


def expected_calibration_error(pred: torch.Tensor, observed: torch.Tensor, num_bins: int) -> float:
    """Equal-width-bin ECE of one prediction vector [n]."""
    return float(calibration_errors(pred.unsqueeze(0), observed, num_bins)[0])


def auc(score: torch.Tensor, label: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann–Whitney), None when only one class is present."""
    positives, negatives = int(label.sum()), int((1 - label).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = torch.empty_like(score)
    ranks[score.argsort()] = torch.arange(1, score.numel() + 1, dtype=score.dtype)
    return float((ranks[label.bool()].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def ngram_acceptance(
    anchored: list[tuple[list[int], list[int]]], ngram: NgramDrafter, block_size: int
) -> tuple[list[list[float]], list[list[list[int]]]]:
    """For (token ids, anchors) pairs: the rate [n − 1][k − 1] at which the n-gram draft proposed
    at an anchor after an n-token suffix match has its k-th token equal to the text's, the earlier
    ones equal, with a Beta(1, 1) prior (so 0.5 where never reached); and the counts behind it,
    [n − 1][k − 1] = [accepted, reached]."""
    counts = [[[0, 0] for _ in range(block_size)] for _ in range(ngram.max_ngram)]
    for ids, anchors in anchored:
        for anchor in anchors:
            draft, match = ngram.match(ids[: anchor + 1], block_size)
            if draft:
                count_outcome(counts[match - 1], draft, ids[anchor + 1 : anchor + 1 + block_size])
    rates = [[(accepted + 1) / (reached + 2) for accepted, reached in row] for row in counts]
    return rates, counts


@torch.no_grad()
def collect(
    model: DrafterModel, target: LoadedModel, config: CalibrateConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[list[int], list[int]]]]:
    """Confidence logits [M, γ], observed prefix acceptance [M, γ] and the sequence index [M] of the
    split's full blocks, and each sequence's (token ids, anchors)."""
    data = open_features(config.cache_dir, config.split, target, model.config.feature_layers)
    if len(data) == 0:
        raise ValueError(f"no {config.split} samples in {config.cache_dir}")
    gen = torch.Generator().manual_seed(config.seed)
    logits_out, accept_out, sequence_out, anchored = [], [], [], []
    for i in tqdm(range(len(data)), desc="calibrate"):
        sample = data[i].to(config.device)
        anchors = choose_anchors(sample.loss_mask.cpu(), config.anchors_per_sequence, gen).to(config.device)
        if anchors.numel() == 0:
            continue
        blocks = teacher_forced_blocks(model, target.model, [sample], [anchors])
        full = blocks.supervised.all(dim=1)
        survive = blocks.survival()
        survive, full = survive.cpu(), full.cpu()
        drawn = (torch.rand(survive.shape, generator=gen) < survive).float().cumprod(dim=1)
        logits_out.append(blocks.confidence.float().cpu()[full])
        accept_out.append(drawn[full])
        sequence_out.append(torch.full((int(full.sum()),), len(anchored)))
        anchored.append((sample.ids.tolist(), anchors.tolist()))
    return torch.cat(logits_out), torch.cat(accept_out), torch.cat(sequence_out), anchored


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread inside the block. The fit's ops are too small to gain from the
    thread pool, and where other work keeps the cores busy each op waits for a descheduled pool
    thread: 100× slower beside a training run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def best_shift(
    logits: torch.Tensor,
    survival: torch.Tensor,
    observed: torch.Tensor,
    num_bins: int,
    shift_range: tuple[float, float],
    points: int = 17,
    rounds: int = 3,
) -> tuple[float, float]:
    """(ECE, b): the shift in `shift_range` whose survival · σ(logits + b) has the least ECE against
    `observed`, by a grid of `points` refined `rounds` times to ± one step around its best point
    (from [-4, 4]: steps 0.5, 0.0625, 0.0078)."""
    low, high = shift_range
    for _ in range(rounds):
        grid = torch.linspace(low, high, points)
        errors = calibration_errors(survival * torch.sigmoid(logits + grid.unsqueeze(1)), observed, num_bins)
        best = int(errors.argmin())
        step = (high - low) / (points - 1)
        low, high = (
            max(float(grid[best]) - step, shift_range[0]),
            min(float(grid[best]) + step, shift_range[1]),
        )
    return float(errors[best]), float(grid[best])


def calibrated_product(
    conf_logits: torch.Tensor, temperatures: list[float], shifts: list[float]
) -> torch.Tensor:
    """Π_{i≤k} σ(logit_i / T_i + b_i) [M, γ]: the calibrated chance that the first k drafts pass."""
    scale = torch.tensor(temperatures, dtype=conf_logits.dtype)
    shift = torch.tensor(shifts, dtype=conf_logits.dtype)
    return torch.sigmoid(conf_logits / scale + shift).cumprod(dim=1)


def fit_calibration(
    conf_logits: torch.Tensor,
    accepted: torch.Tensor,
    num_bins: int,
    temperature_grid: torch.Tensor | None = None,
    shift_range: tuple[float, float] = (-4.0, 4.0),
) -> tuple[list[float], list[float], dict]:
    """Sequential Platt scaling: per position, in order, the T_k of the grid and b_k of the range
    whose survival · σ(logit_k / T_k + b_k) has the least ECE against the prefix acceptance at k.
    Returns the temperatures, the shifts, and ECE/AUC per position. `shift_range` (0, 0) fits the
    temperatures alone."""
    temperature_grid = temperature_grid if temperature_grid is not None else torch.logspace(-1, 1, 81)
    temperatures: list[float] = []
    shifts: list[float] = []
    before_prod = torch.sigmoid(conf_logits).cumprod(dim=1)
    survival = torch.ones(conf_logits.shape[0])
    report = {"position": [], "ece_before": [], "ece_after": [], "auc_before": [], "auc_after": []}
    with one_thread():
        for k in range(conf_logits.shape[1]):
            fits = [  # (T, ECE, b)
                (t, *best_shift(conf_logits[:, k] / t, survival, accepted[:, k], num_bins, shift_range))
                for t in temperature_grid.tolist()
            ]
            t, _, b = min(fits, key=lambda fit: fit[1])  # the first least ECE in grid order
            temperatures.append(t)
            shifts.append(b)
            survival = calibrated_product(conf_logits[:, : k + 1], temperatures, shifts)[:, k]
            report["position"].append(k + 1)
            report["ece_before"].append(
                expected_calibration_error(before_prod[:, k], accepted[:, k], num_bins)
            )
            report["ece_after"].append(expected_calibration_error(survival, accepted[:, k], num_bins))
            report["auc_before"].append(auc(before_prod[:, k], accepted[:, k]))
            report["auc_after"].append(auc(survival, accepted[:, k]))
    return temperatures, shifts, report


def cross_validated_errors(
    conf_logits: torch.Tensor, accepted: torch.Tensor, sequence: torch.Tensor, folds: int, num_bins: int
) -> list[float] | None:
    """ECE per position of calibrations scoring blocks they were not fitted on: sequence s is in fold
    s mod `folds`, each fold is scored by a fit on the other folds, the ECE pooled over all folds.
    None where too few sequences have full blocks to fill every fold."""
    fold = sequence % folds
    if int(fold.unique().numel()) < folds:
        return None
    predicted = torch.empty_like(accepted)
    for f in range(folds):
        held_out = fold == f
        temperatures, shifts, _ = fit_calibration(conf_logits[~held_out], accepted[~held_out], num_bins)
        predicted[held_out] = calibrated_product(conf_logits[held_out], temperatures, shifts)
    return [
        expected_calibration_error(predicted[:, k], accepted[:, k], num_bins)
        for k in range(accepted.shape[1])
    ]


def calibrate(config: CalibrateConfig, target: LoadedModel | None = None) -> dict:
    """Fit the temperatures and shifts, measure n-gram acceptance, write them into the drafter's
    config.json, and save calibration.json."""
    path = resolve_drafter_path(config.drafter)
    model = load_drafter_model(path, config.device).eval()
    if not trained_kind(model.config.kind).confidence_head or not model.config.confidence:
        raise ValueError(
            f"{path} has no confidence head to calibrate (only kinds with one, such as dspark, do)"
        )
    target = target or load_model(model.config.target_name or "smollm2-135m", "float32", config.device)
    # Calibrate the raw head: an earlier calibration must not leak into a re-run.
    conf_logits, accepted, sequence, anchored = collect(model, target, config)
    temperatures, shifts, report = fit_calibration(conf_logits, accepted, config.num_bins)
    report["ece_out_of_sample"] = cross_validated_errors(
        conf_logits, accepted, sequence, config.folds, config.num_bins
    )
    rates, counts = ngram_acceptance(anchored, NgramDrafter(), model.config.draft_block_size)
    calibrated = model.config.calibrated(temperatures=temperatures, shifts=shifts, ngram_acceptance=rates)
    calibrated.save(path / "config.json")
    result = {
        "temperatures": temperatures,
        "shifts": shifts,
        "blocks": int(conf_logits.shape[0]),
        **report,
        "ngram_acceptance": rates,
        "ngram_counts": counts,
    }
    (path / "calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
