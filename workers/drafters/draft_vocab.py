"""A draft vocabulary: the K target tokens a drafter may propose (FR-Spec; EAGLE-3's d2t map).

The drafter's LM head and Markov output table cover only these K rows, so drafting a block costs
K/V of the full head. Column j of the draft logits is target token `ids[j]`. Verification is
untouched and stays exact: the draft distribution is p_d over the subset and 0 elsewhere, scattered
into the target's vocabulary before the acceptance test, which needs nothing else (a token outside
the subset is never drafted, and the residual max(0, p_t − p_d) keeps all of p_t's mass there).

The subset is chosen from the regenerated training data: stop tokens first, then tokens by how
often the target wrote them in responses, then by how often they occur in prompts; ties, and any
room left once the data runs out, go to the lower id (BPE ids rise roughly as merges get rarer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from specray.workers.models.loader import LoadedModel


@dataclass(frozen=True)
class DraftVocab:
    ids: torch.Tensor  # [K] long, ascending target ids: draft column j is target token ids[j]
    target_vocab_size: int

    def __post_init__(self) -> None:
        ids = self.ids
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype != torch.long:
            raise ValueError("a draft vocabulary is a non-empty 1-D tensor of long target ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.target_vocab_size:
            raise ValueError(f"draft vocabulary ids outside the target's 0..{self.target_vocab_size - 1}")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("draft vocabulary ids must be strictly ascending (unique)")

    @property
    def size(self) -> int:
        return self.ids.numel()

    def to_draft(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target ids → draft columns; −1 where a token is outside the subset."""
        pos = torch.searchsorted(self.ids, tokens).clamp(max=self.size - 1)
        return torch.where(self.ids[pos] == tokens, pos, -1)

    def to_target(self, columns: torch.Tensor) -> torch.Tensor:
        """Draft columns → target ids."""
        return self.ids[columns]

    def scatter(self, probs: torch.Tensor) -> torch.Tensor:
        """[..., K] draft probabilities → [..., V] over the target vocabulary, 0 outside the subset."""
        full = probs.new_zeros(*probs.shape[:-1], self.target_vocab_size)
        return full.index_copy_(-1, self.ids.to(probs.device), probs)


def count_tokens(
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(response counts, prompt counts) [V] over (ids, response mask) pairs of the training data."""
    response = torch.zeros(vocab_size, dtype=torch.long)
    prompt = torch.zeros(vocab_size, dtype=torch.long)
    for ids, is_response in samples:
        ids, is_response = ids.long().cpu(), is_response.bool().cpu()
        response += torch.bincount(ids[is_response], minlength=vocab_size)
        prompt += torch.bincount(ids[~is_response], minlength=vocab_size)
    return response, prompt


def select_draft_vocab(
    response_counts: torch.Tensor, prompt_counts: torch.Tensor, size: int, always: Iterable[int] = ()
) -> DraftVocab:
    """The `size` most frequent tokens (see the module doc for the order), `always` included."""
    vocab_size = response_counts.numel()
    always = sorted(set(always))
    if not len(always) <= size <= vocab_size:
        raise ValueError(f"draft vocabulary size {size} must lie in {len(always)}..{vocab_size}")
    # Stable sorts from the least to the most significant key: id, prompt count, response count, always.
    order = torch.arange(vocab_size)
    for key in (prompt_counts, response_counts):
        order = order[torch.sort(key[order], descending=True, stable=True).indices]
    forced = torch.zeros(vocab_size, dtype=torch.bool)
    forced[torch.tensor(always, dtype=torch.long)] = True
    order = order[torch.sort(forced[order].long(), descending=True, stable=True).indices]
    return DraftVocab(order[:size].sort().values, vocab_size)


def coverage(vocab: DraftVocab, tokens: torch.Tensor) -> float:
    """The share of `tokens` (target ids) inside the draft vocabulary."""
    if tokens.numel() == 0:
        return 0.0
    return float((vocab.to_draft(tokens) >= 0).float().mean())


def frequent_tokens(
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int, target: LoadedModel
) -> DraftVocab:
    """The draft vocabulary of `size` tokens for `target` from its training data (ids, response mask),
    every stop token included."""
    response, prompt = count_tokens(samples, target.config.vocab_size)
    always = set(target.stop_token_ids) | set(target.config.eos_token_ids)
    return select_draft_vocab(response, prompt, size, always)
