"""Triton twin of `acceptance.accept_drafts`: the whole ragged batch in one launch, one program per row.

A program walks its row's drafts left to right and stops at the first rejection, so a greedy row reads
the target distribution only up to the position it emits from, and a sampled row reads two scalars per
draft plus two passes over the vocabulary for the correction or bonus token. Every probability is
widened to fp32 right after its load, which is also what the Triton interpreter needs for bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specray.kernels.acceptance import RESIDUAL_EPS


@triton.jit
def _load_probs(ptr, offs, vocab):
    # bf16 under the interpreter: load with a float `other`, widen, then mask.
    valid = offs < vocab
    return tl.where(valid, tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _row_argmax(ptr, vocab, BLOCK_V: tl.constexpr):
    """First index of the maximum of `ptr[0:vocab]`, like torch.argmax."""
    offs = tl.arange(0, BLOCK_V)
    best_val = -float("inf")
    best_idx = 0
    for start in range(0, vocab, BLOCK_V):
        valid = start + offs < vocab
        vals = tl.where(valid, _load_probs(ptr + start, offs, vocab - start), -float("inf"))
        block_max = tl.max(vals, axis=0)
        block_idx = tl.argmax(vals, axis=0)
        # Strictly greater keeps the earliest block on ties.
        better = block_max > best_val
        best_idx = tl.where(better, start + block_idx, best_idx)
        best_val = tl.where(better, block_max, best_val)
    return best_idx


@triton.jit
def _sample_next(
    target_ptr,
    draft_ptr,
    rejected_token,
    rejected,
    uniform,
    vocab,
    residual_eps,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Inverse-CDF sample from norm(max(0, p_t - p_d)) when `rejected`, else from p_t.

    Matches `sample_from_probs`: the token is the number of CDF entries <= uniform * total.
    """
    offs = tl.arange(0, BLOCK_V)
    total_target = 0.0
    total_residual = 0.0
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        p_t = _load_probs(target_ptr, idx, vocab)
        if HAS_DRAFT_PROBS:
            p_d = _load_probs(draft_ptr, idx, vocab)
        else:
            p_d = tl.where(idx == rejected_token, 1.0, 0.0)
        total_target += tl.sum(p_t, axis=0)
        total_residual += tl.sum(tl.maximum(p_t - p_d, 0.0), axis=0)
    # A residual of ~zero mass means p_d covered p_t: fall back to p_t itself.
    use_residual = rejected & (total_residual > residual_eps)
    total = tl.where(use_residual, total_residual, total_target)
    threshold = uniform * total
    carry = 0.0
    count = 0
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        p_t = _load_probs(target_ptr, idx, vocab)
        if HAS_DRAFT_PROBS:
            p_d = _load_probs(draft_ptr, idx, vocab)
        else:
            p_d = tl.where(idx == rejected_token, 1.0, 0.0)
        p = tl.where(use_residual, tl.maximum(p_t - p_d, 0.0), p_t)
        cdf = carry + tl.cumsum(p, axis=0)
        count += tl.sum(((cdf <= threshold) & (idx < vocab)).to(tl.int32), axis=0)
        carry += tl.sum(p, axis=0)
    return tl.minimum(count, vocab - 1)


@triton.jit
def _accept_kernel(
    draft_tokens_ptr,
    num_drafts_ptr,
    target_probs_ptr,
    draft_probs_ptr,
    greedy_ptr,
    uniforms_ptr,
    num_accepted_ptr,
    emitted_ptr,
    num_slots,
    vocab,
    stride_draft_b,
    stride_target_b,
    stride_target_k,
    stride_dprobs_b,
    stride_dprobs_k,
    stride_uniform_b,
    stride_emitted_b,
    residual_eps,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(num_drafts_ptr + row).to(tl.int32)
    is_greedy = tl.load(greedy_ptr + row) != 0
    drafts_ptr = draft_tokens_ptr + row * stride_draft_b
    target_row = target_probs_ptr + row * stride_target_b
    dprobs_row = draft_probs_ptr + row * stride_dprobs_b
    uniform_row = uniforms_ptr + row * stride_uniform_b

    k = 0
    argmax_k = 0
    going = n > 0
    while going:
        token = tl.load(drafts_ptr + k).to(tl.int32)
        if is_greedy:
            argmax_k = _row_argmax(target_row + k * stride_target_k, vocab, BLOCK_V)
            passed = token == argmax_k
        else:
            p_t = tl.load(target_row + k * stride_target_k + token).to(tl.float32)
            if HAS_DRAFT_PROBS:
                p_d = tl.load(dprobs_row + k * stride_dprobs_k + token).to(tl.float32)
            else:
                p_d = 1.0
            # u < p_t / p_d  <=>  u * p_d < p_t, as in the reference.
            passed = tl.load(uniform_row + k) * p_d < p_t
        k = tl.where(passed, k + 1, k)
        going = passed & (k < n)

    rejected = k < n
    if is_greedy:
        # A rejection left the argmax of position k in argmax_k; an all-accepted row still needs it.
        if k == n:
            argmax_k = _row_argmax(target_row + k * stride_target_k, vocab, BLOCK_V)
        next_token = argmax_k
    else:
        rejected_token = tl.load(drafts_ptr + k, mask=rejected, other=0).to(tl.int32)
        next_token = _sample_next(
            target_row + k * stride_target_k,
            dprobs_row + k * stride_dprobs_k,
            rejected_token,
            rejected,
            tl.load(uniform_row + num_slots),
            vocab,
            residual_eps,
            HAS_DRAFT_PROBS,
            BLOCK_V,
        )

    pos = tl.arange(0, BLOCK_G)
    drafts = tl.load(drafts_ptr + pos, mask=pos < k, other=-1).to(tl.int64)
    out = tl.where(pos == k, next_token.to(tl.int64), tl.where(pos < k, drafts, -1))
    tl.store(emitted_ptr + row * stride_emitted_b + pos, out, mask=pos <= num_slots)
    tl.store(num_accepted_ptr + row, k.to(tl.int64))


def accept_drafts_triton(
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: torch.Tensor,
    uniforms: torch.Tensor,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `acceptance.accept_drafts`; `block_v` overrides the vocabulary tile (tests)."""
    batch, num_slots = draft_tokens.shape
    vocab = target_probs.shape[-1]
    # The kernel indexes the vocabulary with unit stride and the other small tensors row by row.
    target_probs = target_probs if target_probs.stride(-1) == 1 else target_probs.contiguous()
    device = target_probs.device
    # Per-row parameters may arrive from the host; the kernel reads them from the probabilities' device.
    draft_tokens = draft_tokens.to(device).contiguous()
    num_drafts = num_drafts.to(device).contiguous()
    greedy = greedy.to(device).contiguous()
    uniforms = uniforms.to(device, torch.float32).contiguous()
    if draft_probs is not None and draft_probs.stride(-1) != 1:
        draft_probs = draft_probs.contiguous()
    dprobs = target_probs if draft_probs is None else draft_probs
    num_accepted = torch.empty(batch, dtype=torch.long, device=device)
    emitted = torch.empty(batch, num_slots + 1, dtype=torch.long, device=device)
    if batch == 0:
        return num_accepted, emitted
    block_v = block_v or min(triton.next_power_of_2(vocab), 4096)
    _accept_kernel[(batch,)](
        draft_tokens,
        num_drafts,
        target_probs,
        dprobs,
        greedy,
        uniforms,
        num_accepted,
        emitted,
        num_slots,
        vocab,
        draft_tokens.stride(0),
        target_probs.stride(0),
        target_probs.stride(1),
        dprobs.stride(0),
        dprobs.stride(1),
        uniforms.stride(0),
        emitted.stride(0),
        RESIDUAL_EPS,
        HAS_DRAFT_PROBS=draft_probs is not None,
        BLOCK_V=block_v,
        BLOCK_G=triton.next_power_of_2(num_slots + 1),
        num_warps=8 if block_v >= 2048 else 4,
    )
    return num_accepted, emitted
