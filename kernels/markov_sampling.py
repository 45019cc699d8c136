"""Draft block sampling with the DSpark Markov head (plain-PyTorch reference and CPU path).

The backbone gives every slot of a block its logits U_k at once; the Markov head then makes slot k
depend on the token drafted at slot k-1:

    p_k = softmax((U_k + W2 · W1[x_{k-1}]) / T),   x_{-1} = anchor,

sampled left to right by inverse CDF with the caller's uniforms (argmax where T = 0, whose draft
distribution is then one-hot). The confidence head reads the same previous token before x_k is drawn:
c_k = σ((w · [h_k; W1[x_{k-1}]] + b) / t_k + s_k), t_k and s_k the calibration temperature and
shift (Platt bias) of position k.
A drafter without Markov head (DFlash) passes no W1/W2 and its confidence weight has only the h part.
A drafter with a draft vocabulary passes `token_ids`: logit column j is token token_ids[j]. W2 then
has one row per column, W1 one row per token id (the anchor may be any token), and the sampled
columns are returned as token ids, the distributions over the columns.
With `candidates` = M, slot k samples only among the M columns of largest U_k: the Markov bias is
added to those alone and every other column has probability 0. That is a different draft
distribution, not an approximation the acceptance test sees: the returned probabilities are the
exact ones each token was drawn with. It turns the Markov head's per-slot [C, r] product, the
sequential part of drafting and most of its cost on a CPU, into an [M, r] gather; on the CPU the
candidate loop runs as one C++ call (`cpu_markov.py`), whose PyTorch twin this is.

Every distribution is computed in fp32 so that the draft probability of a token is the exact value
the acceptance test will divide by.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from specray.kernels import cpu_attention
from specray.kernels.acceptance import sample_from_probs


@dataclass
class MarkovDraft:
    tokens: torch.Tensor  # [B, γ] long token ids
    token_probs: torch.Tensor  # [B, γ] fp32, p_d(x_k) under the distribution x_k was drawn from
    probs: (
        torch.Tensor | None
    )  # [B, γ, V] fp32 full draft distributions over the logit columns, when asked for
    confidence: torch.Tensor | None  # [B, γ] fp32 c_k, when a confidence head is given


def cpu_extension(x: torch.Tensor) -> ModuleType | None:
    """The compiled CPU module (top-k, the candidate loop) where `x` lives on the CPU and it builds."""
    return cpu_attention.extension() if x.device.type == "cpu" else None


def top_columns(logits: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The M largest logits of each slot (fp32) and their columns, [B, γ, M] each: on the CPU by our
    row-wise top-k (`cpu_select.cpp`, ties to the lower column; torch.topk costs ~10x more there)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    ext = cpu_extension(flat)
    values, indices = ext.row_topk(flat, m) if ext is not None else flat.topk(m, dim=-1)
    shape = (*logits.shape[:-1], m)
    return values.view(shape), indices.view(shape)


def check_markov_inputs(
    logits: torch.Tensor,
    w1: torch.Tensor | None,
    w2: torch.Tensor | None,
    hidden: torch.Tensor | None,
    conf_weight: torch.Tensor | None,
    token_ids: torch.Tensor | None = None,
) -> None:
    """Shape checks shared by the reference and the kernel."""
    if (w1 is None) != (w2 is None):
        raise ValueError("the Markov head needs both W1 and W2")
    columns = logits.shape[-1]
    if token_ids is not None and token_ids.shape != (columns,):
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must name the {columns} logit columns")
    if w1 is not None and (
        w1.shape[1] != w2.shape[1] or w2.shape[0] != columns or (token_ids is None and w1.shape[0] != columns)
    ):
        raise ValueError(
            f"W1 {tuple(w1.shape)} must be [V, r] and W2 {tuple(w2.shape)} [C, r], C = {columns} "
            "logit columns (V = C without token_ids)"
        )
    if conf_weight is not None:
        if hidden is None:
            raise ValueError("the confidence head needs the slot hidden states")
        expected = hidden.shape[-1] + (0 if w1 is None else w1.shape[1])
        if conf_weight.numel() != expected:
            raise ValueError(
                f"confidence weight has {conf_weight.numel()} entries, expected d + r = {expected}"
            )


def sample_markov_block(
    logits: torch.Tensor,
    anchor: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
    w1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    conf_weight: torch.Tensor | None = None,
    conf_bias: float = 0.0,
    conf_temperature: torch.Tensor | None = None,
    conf_shift: torch.Tensor | None = None,
    return_probs: bool = False,
    token_ids: torch.Tensor | None = None,
    candidates: int | None = None,
) -> MarkovDraft:
    """Draft one block.

    logits            [B, γ, C] backbone logits U_k = lm_head(h_k) over C columns (C = V without token_ids)
    anchor            [B] long, the last token the target produced
    temperature       [B] float, 0 = argmax
    uniforms          [B, γ] in [0, 1), one per slot
    w1, w2            [V, r] Markov embedding (by token id) and [C, r] Linear(r, C) weight, or None for rank 0
    hidden            [B, γ, d] slot hidden states h_k (needed by the confidence head)
    conf_weight       [d + r] confidence head weight, or None for no confidence
    conf_bias         its bias
    conf_temperature  [γ] calibration temperatures dividing the confidence logit, or None
    conf_shift        [γ] calibration shifts added to the confidence logit after the temperature, or None
    return_probs      also return the full per-slot distributions (needed for rejection sampling)
    token_ids         [C] long, the token id of each logit column (a draft vocabulary), or None
    candidates        M: sample each slot among its M columns of largest U_k only, or None for all
    """
    check_markov_inputs(logits, w1, w2, hidden, conf_weight, token_ids)
    batch, num_slots, vocab = logits.shape
    # [B, γ, M] logits and columns of each slot's candidates, or None: every column is one.
    top = top_columns(logits, candidates) if candidates and candidates < vocab else None
    top_logits, top_cols = top if top is not None else (None, None)
    greedy = temperature <= 0
    inv_temp = torch.where(greedy, 1.0, 1.0 / temperature.float().clamp(min=1e-30)).unsqueeze(1)
    w1f = None if w1 is None else w1.float()
    w2f = None if w2 is None else w2.float()
    with_conf = conf_weight is not None
    if with_conf:
        d_model = hidden.shape[-1]
        # The h part of every slot's confidence logit is independent of the sampled tokens.
        conf_h = hidden.float() @ conf_weight[:d_model].float() + conf_bias
        conf_e = conf_weight[d_model:].float()

    tokens = torch.empty(batch, num_slots, dtype=torch.long, device=logits.device)
    token_probs = torch.empty(batch, num_slots, dtype=torch.float32, device=logits.device)
    probs_out = (
        torch.empty(batch, num_slots, vocab, dtype=torch.float32, device=logits.device)
        if return_probs
        else None
    )
    confidence = (
        torch.empty(batch, num_slots, dtype=torch.float32, device=logits.device) if with_conf else None
    )
    prev = anchor.long()
    all_greedy = bool(greedy.all())
    for k in range(num_slots):
        z = logits[:, k].float() if top is None else top_logits[:, k]
        conf_logit = conf_h[:, k] if with_conf else None
        if w1f is not None:
            emb = w1f[prev]
            if top is None:
                z = z + emb @ w2f.T
            else:
                z = z + torch.bmm(w2f[top_cols[:, k]], emb.unsqueeze(-1)).squeeze(-1)
            if with_conf:
                conf_logit = conf_logit + emb @ conf_e
        if with_conf:
            scale = 1.0 if conf_temperature is None else conf_temperature[k].float()
            shift = 0.0 if conf_shift is None else conf_shift[k].float()
            confidence[:, k] = torch.sigmoid(conf_logit / scale + shift)
        if all_greedy:
            # Argmax drafts have probability 1: no distribution to form.
            pick = z.argmax(dim=-1)
            token_probs[:, k] = 1.0
        else:
            z = z * inv_temp
            p = torch.softmax(z, dim=-1)
            pick = torch.where(greedy, z.argmax(dim=-1), sample_from_probs(p, uniforms[:, k]))
            chosen = p.gather(1, pick.unsqueeze(1)).squeeze(1)
            token_probs[:, k] = torch.where(greedy, 1.0, chosen)
        if return_probs:
            one_hot = torch.zeros_like(z).scatter_(1, pick.unsqueeze(1), 1.0)
            dist = one_hot if all_greedy else torch.where(greedy.unsqueeze(1), one_hot, p)
            probs_out[:, k] = (
                dist if top is None else dist.new_zeros(batch, vocab).scatter_(1, top_cols[:, k], dist)
            )
        column = pick if top is None else top_cols[:, k].gather(1, pick.unsqueeze(1)).squeeze(1)
        token = column if token_ids is None else token_ids[column]
        tokens[:, k] = token
        prev = token
    return MarkovDraft(tokens=tokens, token_probs=token_probs, probs=probs_out, confidence=confidence)
