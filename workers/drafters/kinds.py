"""The table of trained drafter kinds: how each is built, bound to its target, trained and checked.

Adding a kind is one new module (its model and its `Drafter`) and one entry here; checkpoints,
`specray train fit`, calibration, evaluation and serving all read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specray.workers.drafters.config import DrafterConfig
from specray.workers.drafters.dspark import DSparkDrafter, DSparkModel
from specray.workers.drafters.eagle3 import Eagle3Drafter, Eagle3Model
from specray.workers.drafters.loss_weights import LossWeights
from specray.workers.engine.drafter import Drafter
from specray.workers.models.decoder import DecoderModel

DrafterModel = DSparkModel | Eagle3Model


@dataclass(frozen=True)
class TrainedKind:
    name: str
    model: Callable[[DrafterConfig], torch.nn.Module]  # the trainable drafter, from its config
    drafter: Callable[[torch.nn.Module, DecoderModel], Drafter]  # bound to the target, for the engine
    loss: LossWeights  # its training objective
    markov_head: bool = False  # may have DSpark's low-rank Markov head
    confidence_head: bool = False  # has DSpark's confidence head (and so can be calibrated)
    block_slots: bool = True  # drafts a parallel block (DSpark/DFlash), not a chain (EAGLE-3)
    # The first position an anchor may take in training: a chain drafter reads the state before it.
    first_anchor: int = 0

    def check(self, config: DrafterConfig) -> None:
        """Raise ValueError when `config` switches on something this kind does not have."""
        if config.kind != self.name:
            raise ValueError(f"config of a {config.kind} drafter given to {self.name}")
        if config.state_input and not self.block_slots:
            raise ValueError(
                f"state_input is a block-drafter switch; {self.name} always reads the last state"
            )
        if config.markov_rank and not self.markov_head:
            raise ValueError(f"{self.name} has no Markov head (markov_rank must be 0)")
        if config.confidence and not self.confidence_head:
            raise ValueError(f"{self.name} has no confidence head")

    def build(self, config: DrafterConfig) -> DrafterModel:
        self.check(config)
        return self.model(config)


# DSpark's loss; DeepSpec trains DFlash with CE only; EAGLE-3 distils like DSpark, without confidence.
TRAINED_KINDS: dict[str, TrainedKind] = {
    kind.name: kind
    for kind in (
        TrainedKind(
            "dspark", DSparkModel, DSparkDrafter, LossWeights(), markov_head=True, confidence_head=True
        ),
        TrainedKind("dflash", DSparkModel, DSparkDrafter, LossWeights(ce=1.0, l1=0.0, bce=0.0)),
        TrainedKind(
            "eagle3", Eagle3Model, Eagle3Drafter, LossWeights(bce=0.0), block_slots=False, first_anchor=1
        ),
    )
}


def trained_kind(name: str) -> TrainedKind:
    try:
        return TRAINED_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown drafter kind {name!r}: one of {', '.join(TRAINED_KINDS)}") from None
