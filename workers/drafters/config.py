"""The typed configuration of a trained drafter (DSpark, DFlash, EAGLE-3), stored as config.json.

It records the target's shapes the drafter was built against, so loading it against another target
fails loudly instead of producing garbage drafts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from specray.workers.models.config import ModelConfig, RopeConfig


def spread_feature_layers(num_target_layers: int, m: int) -> tuple[int, ...]:
    """DSpark's rule: m layers evenly between layer 1 and L−3, never the (already normed) last one."""
    if m < 1 or num_target_layers < 5:
        raise ValueError(f"need m >= 1 and a target of >= 5 layers, got m={m}, L={num_target_layers}")
    if m == 1:
        return (num_target_layers // 2,)
    return tuple(round(1 + i * (num_target_layers - 4) / (m - 1)) for i in range(m))


@dataclass(frozen=True)
class DrafterConfig:
    kind: str  # an entry of the drafter table (kinds.py), which checks what the kind may switch on
    # Target shapes (the drafter runs at the target's width, heads and RoPE).
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    feature_layers: tuple[int, ...]
    num_layers: int = 1
    # Slots per drafted block (DSpark/DFlash) or chain steps (EAGLE-3): the most drafts it proposes,
    # so serving checks num_speculative_tokens <= draft_block_size at start-up.
    draft_block_size: int = 7
    markov_rank: int = 0  # r; 0 = no Markov head (DFlash, EAGLE-3)
    confidence: bool = False
    mask_token_id: int = 0  # the block's MASK input; a token real text never uses
    # DSpark/DFlash: every block slot's input is in_proj([norm(embed(x)); H_{anchor−1}]) instead of
    # the bare embedding. With tied embeddings the bare anchor embedding makes an untrained layer
    # predict the anchor itself, and the context's last state must otherwise be fetched by attention.
    state_input: bool = False
    # DSpark: the Markov head's tables factor through the target's frozen token geometry,
    # W1[x] = A·norm(embed(x)) and W2 = lm_head·B, so the bigram it learns generalises to tokens
    # the training data rarely shows; otherwise W1 and W2 are free V×r tables.
    markov_tied: bool = False
    # K > 0: the drafter proposes only K target tokens (draft_vocab.py); its LM head and Markov output
    # table have K rows and the ids ship in model.safetensors. 0 = the target's whole vocabulary.
    draft_vocab_size: int = 0
    # M > 0: each block slot samples among its M columns of largest backbone logit only (the Markov
    # head corrects just those; kernels/markov_sampling.py): an inference choice, 0 = every column.
    markov_candidates: int = 0
    # Per-position calibration temperatures dividing the confidence logit (1 = uncalibrated).
    confidence_temperatures: tuple[float, ...] = field(default=())
    # Per-position calibration shifts added to the confidence logit after the temperature (Platt
    # scaling, c_k = σ(logit / T_k + b_k)): a temperature alone cannot move a head that is off by a
    # constant. 0 = uncalibrated; configs saved before the field load with zeros.
    confidence_shifts: tuple[float, ...] = field(default=())
    # [n − 1][k − 1]: how often an n-gram draft's k-th token was accepted, given the earlier ones were,
    # after an n-token suffix match, on the held-out data `calibrate` scores; the prior of a hybrid
    # over this drafter (hybrid.py). () = not measured.
    ngram_acceptance: tuple[tuple[float, ...], ...] = field(default=())
    target_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
        if not self.confidence_temperatures:
            object.__setattr__(self, "confidence_temperatures", (1.0,) * self.draft_block_size)
        object.__setattr__(self, "confidence_temperatures", tuple(map(float, self.confidence_temperatures)))
        if not self.confidence_shifts:
            object.__setattr__(self, "confidence_shifts", (0.0,) * self.draft_block_size)
        object.__setattr__(self, "confidence_shifts", tuple(map(float, self.confidence_shifts)))
        object.__setattr__(
            self, "ngram_acceptance", tuple(tuple(map(float, r)) for r in self.ngram_acceptance)
        )
        if self.num_layers < 1 or self.draft_block_size < 1 or self.markov_rank < 0:
            raise ValueError("need num_layers >= 1, draft_block_size >= 1, markov_rank >= 0")
        if not self.feature_layers:
            raise ValueError("a feature drafter needs at least one target feature layer")
        if self.markov_tied and not self.markov_rank:
            raise ValueError("markov_tied needs a Markov head (markov_rank >= 1)")
        if self.markov_candidates < 0 or (self.markov_candidates and not self.markov_rank):
            raise ValueError("markov_candidates must be >= 0, and > 0 only with a Markov head")
        if (
            len(self.confidence_temperatures) != self.draft_block_size
            or min(self.confidence_temperatures) <= 0
        ):
            raise ValueError("need one positive confidence temperature per block position")
        if len(self.confidence_shifts) != self.draft_block_size or not all(
            map(math.isfinite, self.confidence_shifts)
        ):
            raise ValueError("need one finite confidence shift per block position")
        if any(
            len(row) != self.draft_block_size or not all(0 < a < 1 for a in row)
            for row in self.ngram_acceptance
        ):
            raise ValueError(
                "ngram_acceptance needs one rate in (0, 1) per block position for each match length"
            )
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} outside 0..{self.vocab_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the vocabulary")

    @classmethod
    def for_target(cls, kind: str, target: ModelConfig, num_features: int, **kwargs) -> DrafterConfig:
        return cls(
            kind=kind,
            vocab_size=target.vocab_size,
            hidden_size=target.hidden_size,
            intermediate_size=target.intermediate_size,
            num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope.theta,
            feature_layers=spread_feature_layers(target.num_layers, num_features),
            **kwargs,
        )

    @property
    def output_vocab_size(self) -> int:
        """Rows of the drafter's LM head: the draft vocabulary, or the target's."""
        return self.draft_vocab_size or self.vocab_size

    def layer_config(self) -> ModelConfig:
        """A Llama-style layer config at the target's shapes (the drafter's own layers)."""
        return ModelConfig(
            family="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=1 << 20,
            rope=RopeConfig(theta=self.rope_theta),
        )

    def check_target(self, target: ModelConfig) -> None:
        mine = (self.vocab_size, self.hidden_size, self.num_heads, self.head_dim)
        theirs = (target.vocab_size, target.hidden_size, target.num_heads, target.head_dim)
        if mine != theirs or max(self.feature_layers) >= target.num_layers:
            raise ValueError(f"drafter built for (V, d, heads, head_dim)={mine}, target has {theirs}")

    def calibrated(
        self, *, temperatures: list[float], shifts: list[float], ngram_acceptance: list[list[float]]
    ) -> DrafterConfig:
        return replace(
            self,
            confidence_temperatures=tuple(temperatures),
            confidence_shifts=tuple(shifts),
            ngram_acceptance=ngram_acceptance,
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DrafterConfig:
        fields = json.loads(Path(path).read_text())
        if "block_size" in fields:
            raise ValueError(
                f"{path}: `block_size` is now `draft_block_size` (block_size names KV pages only)"
            )
        return cls(**fields)
