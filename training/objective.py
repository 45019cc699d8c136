"""The DeepSpec drafter loss and the choice of anchors (many blocks per sequence).

loss = ce·CE(labels) + l1·‖p_d − p_t‖₁ + bce·BCE(c_k, 1 − ½‖p_d − p_t‖₁) on the Markov-corrected
logits, each term a weighted mean with position weights exp(−k/decay). A slot is supervised only
when its label lies inside the sequence and on response text, and only while every earlier slot of
its block is supervised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from specray.training.target_cache import CachedSample
from specray.workers.drafters.draft_vocab import DraftVocab
from specray.workers.drafters.loss_weights import LossWeights


def choose_anchors(
    loss_mask: torch.Tensor, max_anchors: int, generator: torch.Generator, min_anchor: int = 1
) -> torch.Tensor:
    """Up to `max_anchors` sorted anchor positions whose first label (anchor + 1) is response text."""
    length = loss_mask.shape[0]
    candidates = torch.arange(min_anchor, length - 1, device=loss_mask.device)
    candidates = candidates[loss_mask[candidates + 1]]
    if candidates.numel() > max_anchors:
        pick = torch.randperm(candidates.numel(), generator=generator)[:max_anchors].to(candidates.device)
        candidates = candidates[pick.sort().values]
    return candidates


def block_labels(
    ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, draft_block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels [N, γ], supervised [N, γ] bool and the target's predicting positions [N, γ]."""
    length = ids.shape[0]
    label_pos = anchors.unsqueeze(1) + 1 + torch.arange(draft_block_size, device=anchors.device)
    inside = label_pos < length
    clamped = label_pos.clamp(max=length - 1)
    supervised = (inside & loss_mask[clamped]).long().cumprod(dim=1).bool()
    return ids[clamped], supervised, clamped - 1


@dataclass
class TargetProbs:
    """The target's distribution as a drafter's loss reads it: p_t over the drafter's K output
    columns and the mass p_t puts outside them (0 without a draft vocabulary). K columns instead of
    the target's V keep a block's [N, γ, ·] tensors 6× smaller at K = 8k of 49k."""

    inside: torch.Tensor  # [.., K]
    outside: torch.Tensor  # [..]

    @classmethod
    def of_logits(cls, target_logits: torch.Tensor, vocab: DraftVocab | None) -> TargetProbs:
        p_t = target_logits.float().softmax(-1)
        if vocab is None:
            return cls(p_t, p_t.new_zeros(p_t.shape[:-1]))
        inside = p_t[..., vocab.ids.to(p_t.device)]
        return cls(inside, (1.0 - inside.sum(-1)).clamp(min=0.0))

    def __getitem__(self, index: torch.Tensor) -> TargetProbs:
        return TargetProbs(self.inside[index], self.outside[index])


@dataclass
class TeacherForcedBlocks:
    """A drafter's blocks over cached sequences, slot k's previous token the true x_{k−1}."""

    labels: torch.Tensor  # [N, γ] the true tokens at anchor+k+1
    supervised: torch.Tensor  # [N, γ] bool
    logits: torch.Tensor  # [N, γ, K] Markov-corrected draft logits over the output vocabulary
    confidence: torch.Tensor | None  # [N, γ] confidence logits (DSpark)
    target: TargetProbs  # [N, γ, ..] the target's distribution at the same positions
    vocab: DraftVocab | None = None  # the draft vocabulary the K columns name (None: K = V)
    sequence_of: torch.Tensor | None = None  # [N] the sequence each block comes from (None: one)

    def survival(self) -> torch.Tensor:
        """[N, γ] P(a sampled draft survives verification at T = 1) = 1 − ½‖p_d − p_t‖₁."""
        l1 = l1_distance(self.logits.float().softmax(-1), self.target)
        return (1.0 - 0.5 * l1).clamp(0.0, 1.0)

    def greedy_tokens(self) -> torch.Tensor:
        """[N, γ] the drafts at T = 0, as target token ids."""
        return greedy_tokens(self.logits, self.vocab)


def l1_distance(p_d: torch.Tensor, p_t: TargetProbs) -> torch.Tensor:
    """‖p_d − p_t‖₁ over the target vocabulary, p_d [.., K] being 0 outside the draft vocabulary."""
    return (p_d - p_t.inside).abs().sum(-1) + p_t.outside


def greedy_tokens(logits: torch.Tensor, vocab: DraftVocab | None) -> torch.Tensor:
    columns = logits.argmax(-1)
    return columns if vocab is None else vocab.to_target(columns)


def teacher_forced_blocks(
    model: torch.nn.Module,
    target: torch.nn.Module,
    samples: list[CachedSample],
    anchors: list[torch.Tensor],
    teacher: torch.nn.Module | None = None,
) -> TeacherForcedBlocks:
    """Score a drafter's blocks at `anchors[b]` (non-empty) of each cached sequence `samples[b]`,
    all sequences in one drafter forward (row b of the batch, padded to the longest sequence and
    to the most anchors; padding blocks are dropped). The target never runs its layers: its
    distribution comes from `teacher`'s LM head (default: the target's), outside any autocast, so
    a bf16 copy of the target there runs as it serves, without recasting the head."""
    counts = [a.numel() for a in anchors]
    if min(counts) < 1:
        raise ValueError("every sequence needs at least one anchor")
    block_len, most = model.config.draft_block_size, max(counts)
    labels, supervised, hidden, inverse, unique_rows = [], [], [], [], 0
    for sample, at in zip(samples, anchors):
        block, supervised_slots, target_pos = block_labels(sample.ids, sample.loss_mask, at, block_len)
        labels.append(block)
        supervised.append(supervised_slots)
        # Each target position serves up to γ slots: its distribution is computed once, then shared.
        unique, index = target_pos.unique(return_inverse=True)
        hidden.append(sample.final_hidden[unique])
        inverse.append(index + unique_rows)
        unique_rows += unique.numel()
    padded_anchors = torch.stack([torch.cat((a, a[:1].expand(most - a.numel()))) for a in anchors])
    kept = torch.arange(most, device=padded_anchors.device) < torch.tensor(
        counts, device=padded_anchors.device
    ).unsqueeze(1)
    logits, confidence = model.training_outputs(
        pad_sequence([s.features for s in samples], batch_first=True),
        pad_sequence([s.ids for s in samples], batch_first=True),
        padded_anchors,
        target,
    )
    vocab = model.draft_vocab()
    teacher = teacher or target
    head = teacher.lm_head.weight
    with torch.no_grad(), torch.autocast(head.device.type, enabled=False):
        rows = torch.cat(hidden).to(head.dtype)
        target_probs = TargetProbs.of_logits(teacher.compute_logits(rows), vocab)
    return TeacherForcedBlocks(
        torch.cat(labels),
        torch.cat(supervised),
        logits[kept],
        None if confidence is None else confidence[kept],
        target_probs[torch.cat(inverse)],
        vocab,
        torch.arange(len(samples), device=kept.device).repeat_interleave(
            torch.tensor(counts, device=kept.device)
        ),
    )


def drafter_loss(
    logits: torch.Tensor,
    confidence_logits: torch.Tensor | None,
    target: TargetProbs,
    labels: torch.Tensor,
    supervised: torch.Tensor,
    weights: LossWeights,
    vocab: DraftVocab | None = None,
    sequence_of: torch.Tensor | None = None,
    num_sequences: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss over [N, γ, K] draft logits (Markov-corrected) against the target's distribution.

    Each sequence's blocks (`sequence_of` [N]; None: all one sequence) form a weighted mean, and
    the loss is the mean of those over `num_sequences` (sequences without blocks count 0).
    With a draft vocabulary, p_d is 0 outside it: the L1 term counts p_t's mass there, and a label
    outside it has no CE (the drafter cannot propose it).
    """
    block_len = logits.shape[1]
    position_weight = torch.tensor(
        [math.exp(-k / weights.decay) for k in range(block_len)], device=logits.device
    )
    if sequence_of is None:
        sequence_of = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    w = position_weight.unsqueeze(0) * supervised.float()
    totals = w.new_zeros(num_sequences).index_add_(0, sequence_of, w.sum(1)).clamp(min=1e-9)
    w = w / (totals[sequence_of] * num_sequences).unsqueeze(1)
    log_pd = logits.float().log_softmax(-1)
    p_d = log_pd.exp()
    columns = labels if vocab is None else vocab.to_draft(labels)
    ce = F.nll_loss(log_pd.flatten(0, 1), columns.clamp(min=0).flatten(), reduction="none").view_as(w)
    ce = ce * (columns >= 0)
    l1 = l1_distance(p_d, target)
    loss = weights.ce * (w * ce).sum() + weights.l1 * (w * l1).sum()
    metrics = {"ce": float((w * ce).detach().sum()), "l1": float((w * l1).detach().sum())}
    if confidence_logits is not None and weights.bce > 0:
        # c*_k: the probability a sampled draft survives verification at T = 1.
        accept = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), accept, reduction="none")
        loss = loss + weights.bce * (w * bce).sum()
        metrics["bce"] = float((w * bce).detach().sum())
    first = supervised[:, 0].float()
    hits = (greedy_tokens(logits[:, 0], vocab) == labels[:, 0]).float() * first
    per_sequence = w.new_zeros(num_sequences).index_add_(0, sequence_of, hits)
    counted = w.new_zeros(num_sequences).index_add_(0, sequence_of, first).clamp(min=1)
    metrics["acc0"] = float((per_sequence / counted).sum() / num_sequences)
    return loss, metrics
