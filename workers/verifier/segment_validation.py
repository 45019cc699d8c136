"""What a verifier checks in a draft worker's messages beyond their shape.

A segment's draft probabilities enter the acceptance test of a batch that many sessions share, so a
NaN, a negative mass or a zero probability for the drafted token is refused at the door rather than
discovered in a step. A resumed session's open must leave it room to generate.
"""

from __future__ import annotations

import torch

# float32 sums over a 50k-entry row drift by ~1e-4; a real distribution is far inside this.
ROW_SUM_TOLERANCE = 1e-2


def check_draft_probs(probs: torch.Tensor, tokens: list[int], vocab_size: int) -> None:
    """Raise ValueError unless `probs` is [len(tokens), V] of distributions giving each draft mass > 0."""
    if tuple(probs.shape) != (len(tokens), vocab_size):
        raise ValueError(f"draft_probs must be [{len(tokens)}, {vocab_size}], got {list(probs.shape)}")
    if not tokens:
        return
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("draft_probs must be finite")
    if bool((probs < 0).any()) or bool((probs > 1).any()):
        raise ValueError("draft_probs must lie in [0, 1]")
    if bool(((probs.sum(dim=-1) - 1).abs() > ROW_SUM_TOLERANCE).any()):
        raise ValueError("each row of draft_probs must sum to 1")
    # A token drawn from p_d has p_d(token) > 0; a zero would let the acceptance test pass anything.
    drafted = probs.gather(-1, torch.tensor(tokens, dtype=torch.long).unsqueeze(-1))
    if bool((drafted <= 0).any()):
        raise ValueError("draft_probs gives a drafted token zero probability")


def split_resumed(token_ids: list[int], prompt_len: int, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt, committed output) of an OpenSession; prompt_len 0 means a fresh session."""
    if prompt_len > len(token_ids):
        raise ValueError(f"prompt_len {prompt_len} exceeds the {len(token_ids)} token ids")
    cut = prompt_len or len(token_ids)
    if len(token_ids) - cut >= max_tokens:
        raise ValueError(f"a resumed session has {len(token_ids) - cut} of its {max_tokens} tokens already")
    return token_ids[:cut], token_ids[cut:]
