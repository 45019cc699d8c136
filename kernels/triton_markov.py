"""Triton twin of `markov_sampling.sample_markov_block`.

Slot k needs the token of slot k-1, so the block is sampled slot by slot, two launches per slot:
- `_partial_kernel`, grid (row tiles, vocabulary tiles): biased logits z = (U_k + W2·W1[x_{k-1}]) / T
  for a tile of rows and vocabulary (the low-rank bias as a tensor-core dot, so W2 is read once per
  row tile), reduced to per-tile max, sum of exp and argmax; z itself is kept only when the caller
  asked for the full distributions, in the output buffer.
- `_select_kernel`, grid (rows,): combines the tiles into the softmax normaliser, finds the tile in
  which the inverse-CDF threshold falls, recomputes that one tile to place the token, and writes the
  token, its probability and the confidence of the slot.
A last launch turns the kept logits into probabilities. No full-vocabulary copy is written otherwise.
With a draft vocabulary (`token_ids`) the kernels work on logit columns and write the chosen
column's token id; W1 is read by token id, W2 by column.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from specray.kernels.markov_sampling import MarkovDraft, check_markov_inputs

_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _load_f32(ptr, mask):
    # bf16 under the interpreter: load with a float `other`, widen, then mask.
    return tl.where(mask, tl.load(ptr, mask=mask, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _partial_kernel(
    logits_ptr,
    prev_ptr,
    temperature_ptr,
    w1_ptr,
    w2_ptr,
    logits_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_arg_ptr,
    k,
    batch,
    vocab,
    rank,
    num_tiles,
    stride_logits_b,
    stride_logits_k,
    stride_prev,
    stride_out_b,
    stride_out_k,
    HAS_MARKOV: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    tile = tl.program_id(1)
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < batch
    col_ok = cols < vocab
    rows64 = rows.to(tl.int64)
    both = row_ok[:, None] & col_ok[None, :]
    z = _load_f32(logits_ptr + rows64[:, None] * stride_logits_b + k * stride_logits_k + cols[None, :], both)
    if HAS_MARKOV:
        prev = tl.load(prev_ptr + rows64 * stride_prev, mask=row_ok, other=0).to(tl.int64)
        r_offs = tl.arange(0, BLOCK_R)
        bias = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + r_offs
            r_ok = r < rank
            emb = _load_f32(w1_ptr + prev[:, None] * rank + r[None, :], row_ok[:, None] & r_ok[None, :])
            w2 = _load_f32(
                w2_ptr + cols.to(tl.int64)[:, None] * rank + r[None, :], col_ok[:, None] & r_ok[None, :]
            )
            bias += tl.dot(emb.to(DOT_DTYPE), tl.trans(w2.to(DOT_DTYPE)), input_precision="ieee")
        z += bias
    temp = tl.load(temperature_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    z = z * (1.0 / tl.where(temp > 0, temp, 1.0))[:, None]
    z = tl.where(col_ok[None, :], z, -float("inf"))
    if STORE_LOGITS:
        tl.store(
            logits_out_ptr + rows64[:, None] * stride_out_b + k * stride_out_k + cols[None, :], z, mask=both
        )
    tile_max = tl.max(z, axis=1)
    # A tile of banned tokens (-inf logits) has max -inf: its sum must be 0, not exp(-inf + inf) = NaN.
    ref = tl.where(tile_max == -float("inf"), 0.0, tile_max)
    tile_sum = tl.sum(tl.exp(z - ref[:, None]), axis=1)
    tile_arg = tile * BLOCK_V + tl.argmax(z, axis=1)
    part = rows64 * num_tiles + tile
    tl.store(part_max_ptr + part, tile_max, mask=row_ok)
    tl.store(part_sum_ptr + part, tile_sum, mask=row_ok)
    tl.store(part_arg_ptr + part, tile_arg, mask=row_ok)


@triton.jit
def _select_kernel(
    logits_ptr,
    prev_ptr,
    temperature_ptr,
    uniforms_ptr,
    w1_ptr,
    w2_ptr,
    hidden_ptr,
    conf_w_ptr,
    conf_temp_ptr,
    conf_shift_ptr,
    token_ids_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_arg_ptr,
    tokens_ptr,
    token_probs_ptr,
    confidence_ptr,
    stats_ptr,
    conf_bias,
    k,
    num_slots,
    vocab,
    rank,
    d_model,
    num_tiles,
    stride_logits_b,
    stride_logits_k,
    stride_prev,
    stride_uniform_b,
    stride_hidden_b,
    stride_hidden_k,
    HAS_MARKOV: tl.constexpr,
    HAS_CONF: tl.constexpr,
    HAS_CONF_TEMP: tl.constexpr,
    HAS_CONF_SHIFT: tl.constexpr,
    HAS_IDS: tl.constexpr,
    STORE_STATS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    prev = tl.load(prev_ptr + row * stride_prev).to(tl.int64)
    temp = tl.load(temperature_ptr + row).to(tl.float32)
    r_offs = tl.arange(0, BLOCK_R)
    out = row * num_slots + k

    if HAS_CONF:
        # c_k sees x_{k-1} (prev), never x_k.
        d_offs = tl.arange(0, BLOCK_D)
        conf_logit = conf_bias
        for d0 in range(0, d_model, BLOCK_D):
            d = d0 + d_offs
            h = _load_f32(hidden_ptr + row * stride_hidden_b + k * stride_hidden_k + d, d < d_model)
            conf_logit += tl.sum(h * _load_f32(conf_w_ptr + d, d < d_model), axis=0)
        if HAS_MARKOV:
            for r0 in range(0, rank, BLOCK_R):
                r = r0 + r_offs
                emb = _load_f32(w1_ptr + prev * rank + r, r < rank)
                conf_logit += tl.sum(emb * _load_f32(conf_w_ptr + d_model + r, r < rank), axis=0)
        if HAS_CONF_TEMP:
            conf_logit = conf_logit / tl.load(conf_temp_ptr + k).to(tl.float32)
        if HAS_CONF_SHIFT:
            conf_logit = conf_logit + tl.load(conf_shift_ptr + k).to(tl.float32)
        tl.store(confidence_ptr + out, tl.sigmoid(conf_logit))

    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_tiles
    part = row * num_tiles + s
    tile_max = tl.load(part_max_ptr + part, mask=s_ok, other=-float("inf"))
    tile_sum = tl.load(part_sum_ptr + part, mask=s_ok, other=0.0)
    z_max = tl.max(tile_max, axis=0)
    mass = tile_sum * tl.exp(tile_max - z_max)
    total = tl.sum(mass, axis=0)
    # Greedy: the first tile holding the maximum, and its (first) argmax.
    best_tile = tl.argmax(tile_max, axis=0)
    token = tl.sum(tl.where(s == best_tile, tl.load(part_arg_ptr + part, mask=s_ok, other=0), 0), axis=0)
    token_prob = 1.0
    if temp > 0:
        threshold = tl.load(uniforms_ptr + row * stride_uniform_b + k).to(tl.float32) * total
        hit = tl.minimum(
            tl.sum(((tl.cumsum(mass, axis=0) <= threshold) & s_ok).to(tl.int32), axis=0), num_tiles - 1
        )
        carry = tl.sum(tl.where(s < hit, mass, 0.0), axis=0)
        v = tl.arange(0, BLOCK_V)
        cols = hit * BLOCK_V + v
        col_ok = cols < vocab
        z = _load_f32(logits_ptr + row * stride_logits_b + k * stride_logits_k + cols, col_ok)
        if HAS_MARKOV:
            for r0 in range(0, rank, BLOCK_R):
                r = r0 + r_offs
                r_ok = r < rank
                emb = _load_f32(w1_ptr + prev * rank + r, r_ok)
                w2 = _load_f32(
                    w2_ptr + cols.to(tl.int64)[:, None] * rank + r[None, :], col_ok[:, None] & r_ok[None, :]
                )
                z += tl.sum(w2 * emb[None, :], axis=1)
        z = tl.where(col_ok, z * (1.0 / temp), -float("inf"))
        p = tl.exp(z - z_max)
        cdf = carry + tl.cumsum(p, axis=0)
        idx = tl.sum(((cdf <= threshold) & col_ok).to(tl.int32), axis=0)
        # Rounding between the tile sums and this recomputation must not land on a zero-mass token.
        last_positive = tl.max(tl.where((p > 0) & col_ok, v, 0), axis=0)
        idx = tl.minimum(idx, last_positive)
        token = hit * BLOCK_V + idx
        token_prob = tl.exp(tl.sum(tl.where(v == idx, z, 0.0), axis=0) - z_max) / total
    if HAS_IDS:
        token = tl.load(token_ids_ptr + token)
    tl.store(tokens_ptr + out, token.to(tl.int64))
    tl.store(token_probs_ptr + out, token_prob)
    if STORE_STATS:
        tl.store(stats_ptr + out * 2, z_max)
        tl.store(stats_ptr + out * 2 + 1, total)


@triton.jit
def _normalize_kernel(
    probs_ptr,
    stats_ptr,
    tokens_ptr,
    temperature_ptr,
    token_ids_ptr,
    num_slots,
    vocab,
    HAS_IDS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    k = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    col_ok = cols < vocab
    out = row * num_slots + k
    ptrs = probs_ptr + out * vocab + cols
    z = tl.load(ptrs, mask=col_ok, other=0.0)
    p = tl.exp(z - tl.load(stats_ptr + out * 2)) / tl.load(stats_ptr + out * 2 + 1)
    greedy = tl.load(temperature_ptr + row) <= 0
    if HAS_IDS:
        col_tokens = tl.load(token_ids_ptr + cols, mask=col_ok, other=-1)
    else:
        col_tokens = cols
    one_hot = tl.where(col_tokens == tl.load(tokens_ptr + out), 1.0, 0.0)
    tl.store(ptrs, tl.where(greedy, one_hot, p), mask=col_ok)


def sample_markov_block_triton(
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
    block_v: int | None = None,
) -> MarkovDraft:
    """Same contract as `markov_sampling.sample_markov_block`; `block_v` overrides the vocabulary tile."""
    check_markov_inputs(logits, w1, w2, hidden, conf_weight, token_ids)
    batch, num_slots, vocab = logits.shape
    device = logits.device
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    # Per-row parameters may arrive from the host; the kernels read them from the logits' device.
    anchor = anchor.to(device)
    temperature = temperature.to(device, torch.float32).contiguous()
    uniforms = uniforms.to(device, torch.float32).contiguous()
    if conf_temperature is not None:
        conf_temperature = conf_temperature.to(device, torch.float32).contiguous()
    if conf_shift is not None:
        conf_shift = conf_shift.to(device, torch.float32).contiguous()
    if token_ids is not None:
        token_ids = token_ids.to(device, torch.long).contiguous()
    has_markov = w1 is not None
    rank = w1.shape[1] if has_markov else 0
    if has_markov:
        w1, w2 = w1.contiguous(), w2.contiguous()
    has_conf = conf_weight is not None
    if has_conf:
        hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        conf_weight = conf_weight.contiguous()
    d_model = hidden.shape[-1] if has_conf else 0

    tokens = torch.empty(batch, num_slots, dtype=torch.long, device=device)
    token_probs = torch.empty(batch, num_slots, dtype=torch.float32, device=device)
    confidence = torch.empty(batch, num_slots, dtype=torch.float32, device=device) if has_conf else None
    probs = torch.empty(batch, num_slots, vocab, dtype=torch.float32, device=device) if return_probs else None
    stats = torch.empty(batch, num_slots, 2, dtype=torch.float32, device=device) if return_probs else None
    if batch == 0 or num_slots == 0:
        return MarkovDraft(tokens=tokens, token_probs=token_probs, probs=probs, confidence=confidence)

    # Wider row tiles read W2 fewer times at large batch; narrower vocabulary tiles keep registers in check.
    block_b = 16 if batch <= 16 else 32 if batch <= 32 else 64
    block_v = block_v or (256 if block_b <= 32 else 128)
    block_r = min(64, max(16, triton.next_power_of_2(max(rank, 1))))
    num_tiles = triton.cdiv(vocab, block_v)
    part_max = torch.empty(batch, num_tiles, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_arg = torch.empty(batch, num_tiles, dtype=torch.int32, device=device)
    # The interpreter multiplies half-precision dots wrongly; exact in fp32 and the same products.
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    dot_dtype = tl.float32 if interpreting or not has_markov else _DOT_DTYPES[w2.dtype]
    dummy = token_probs  # stands in for absent optional tensors; never read

    for k in range(num_slots):
        prev = anchor if k == 0 else tokens[:, k - 1]
        _partial_kernel[(triton.cdiv(batch, block_b), num_tiles)](
            logits,
            prev,
            temperature,
            w1 if has_markov else dummy,
            w2 if has_markov else dummy,
            probs if return_probs else dummy,
            part_max,
            part_sum,
            part_arg,
            k,
            batch,
            vocab,
            rank,
            num_tiles,
            logits.stride(0),
            logits.stride(1),
            prev.stride(0),
            probs.stride(0) if return_probs else 0,
            probs.stride(1) if return_probs else 0,
            HAS_MARKOV=has_markov,
            STORE_LOGITS=return_probs,
            DOT_DTYPE=dot_dtype,
            BLOCK_B=block_b,
            BLOCK_V=block_v,
            BLOCK_R=block_r,
            num_warps=8 if block_b == 64 else 4,
        )
        _select_kernel[(batch,)](
            logits,
            prev,
            temperature,
            uniforms,
            w1 if has_markov else dummy,
            w2 if has_markov else dummy,
            hidden if has_conf else dummy,
            conf_weight if has_conf else dummy,
            conf_temperature if conf_temperature is not None else dummy,
            conf_shift if conf_shift is not None else dummy,
            token_ids if token_ids is not None else dummy,
            part_max,
            part_sum,
            part_arg,
            tokens,
            token_probs,
            confidence if has_conf else dummy,
            stats if return_probs else dummy,
            float(conf_bias),
            k,
            num_slots,
            vocab,
            rank,
            d_model,
            num_tiles,
            logits.stride(0),
            logits.stride(1),
            prev.stride(0),
            uniforms.stride(0),
            hidden.stride(0) if has_conf else 0,
            hidden.stride(1) if has_conf else 0,
            HAS_MARKOV=has_markov,
            HAS_CONF=has_conf,
            HAS_CONF_TEMP=conf_temperature is not None,
            HAS_CONF_SHIFT=conf_shift is not None,
            HAS_IDS=token_ids is not None,
            STORE_STATS=return_probs,
            BLOCK_S=triton.next_power_of_2(num_tiles),
            BLOCK_V=block_v,
            BLOCK_R=block_r,
            BLOCK_D=min(1024, triton.next_power_of_2(max(d_model, 1))),
        )
    if return_probs:
        _normalize_kernel[(num_tiles, num_slots, batch)](
            probs,
            stats,
            tokens,
            temperature,
            token_ids if token_ids is not None else dummy,
            num_slots,
            vocab,
            HAS_IDS=token_ids is not None,
            BLOCK_V=block_v,
        )
    return MarkovDraft(tokens=tokens, token_probs=token_probs, probs=probs, confidence=confidence)
