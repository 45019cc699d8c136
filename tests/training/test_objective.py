"""The drafter loss over a draft vocabulary is the loss of the same drafter over the whole
vocabulary with p_d = 0 outside the subset; a label it can never propose adds no CE."""

from __future__ import annotations

import pytest
import torch

from specray.training.objective import TargetProbs, drafter_loss
from specray.workers.drafters.draft_vocab import DraftVocab
from specray.workers.drafters.loss_weights import LossWeights

VOCAB = DraftVocab(torch.tensor([0, 3, 4, 7, 9, 10]), 12)


def _case(labels: torch.Tensor, vocab: DraftVocab | None = VOCAB) -> tuple:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, VOCAB.size, generator=g)
    target = TargetProbs.of_logits(torch.randn(5, 3, 12, generator=g), vocab)
    confidence = torch.randn(5, 3, generator=g)
    return logits, confidence, target, labels, torch.ones(5, 3, dtype=torch.bool), LossWeights()


def test_reduced_loss_equals_the_full_loss_with_the_rest_banned() -> None:
    labels = VOCAB.ids[torch.randint(0, VOCAB.size, (5, 3), generator=torch.Generator().manual_seed(1))]
    logits, *reduced_case = _case(labels)
    _, *full_case = _case(labels, vocab=None)
    full_logits = torch.full((5, 3, 12), -float("inf"))
    full_logits[..., VOCAB.ids] = logits
    reduced_loss, reduced = drafter_loss(logits, *reduced_case, VOCAB)
    full_loss, full = drafter_loss(full_logits, *full_case)
    torch.testing.assert_close(reduced_loss, full_loss)
    assert reduced == pytest.approx(full, abs=1e-6)


def test_an_undraftable_label_adds_no_ce() -> None:
    labels = torch.full((5, 3), 3)
    labels[0, 0] = 5  # outside the draft vocabulary
    loss, metrics = drafter_loss(*_case(labels), VOCAB)
    assert torch.isfinite(loss)
    _, draftable = drafter_loss(*_case(torch.full((5, 3), 3)), VOCAB)
    assert metrics["ce"] < draftable["ce"] and metrics["l1"] == pytest.approx(draftable["l1"])
