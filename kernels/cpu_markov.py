"""The Markov block sampler's candidate path on the CPU as one C++ call (`cpu_markov.cpp`).

Same contract and distributions as `markov_sampling.sample_markov_block` with `candidates` (its
PyTorch twin): the candidate columns come from the same top-k, the confidence's h part from the same
product; the per-slot loop (Markov bias over the M candidates, confidence, argmax or inverse-CDF
draw) runs in C++, where in PyTorch it is ~10 small ops per slot. fp32 throughout, the returned
probabilities being the ones each token was drawn with, so verification stays exact; values agree
with the twin to float rounding (`tests/kernels/test_cpu_markov.py`).
"""

from __future__ import annotations

from types import ModuleType

import torch

from specray.kernels.markov_sampling import MarkovDraft, check_markov_inputs, top_columns


def sample_candidates(
    ext: ModuleType,
    logits: torch.Tensor,
    anchor: torch.Tensor,
    temperature: torch.Tensor,
    uniforms: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    hidden: torch.Tensor | None,
    conf_weight: torch.Tensor | None,
    conf_bias: float,
    conf_temperature: torch.Tensor | None,
    conf_shift: torch.Tensor | None,
    return_probs: bool,
    token_ids: torch.Tensor | None,
    candidates: int,
) -> MarkovDraft:
    """`markov_sampling.sample_markov_block(..., candidates)` through the compiled module `ext`."""
    check_markov_inputs(logits, w1, w2, hidden, conf_weight, token_ids)
    _, num_slots, columns = logits.shape
    top_logits, top_cols = top_columns(logits, min(candidates, columns))
    scale = torch.ones(num_slots) if conf_temperature is None else conf_temperature.float()
    conf_h = conf_e = None
    if conf_weight is not None:
        d_model = hidden.shape[-1]
        conf_h = hidden.float() @ conf_weight[:d_model].float() + conf_bias
        if conf_shift is not None:
            # The loop divides slot k's logit by scale[k]: s_k · t_k in the numerator adds s_k after it.
            conf_h = conf_h + conf_shift.float() * scale
        conf_h = conf_h.contiguous()
        conf_e = conf_weight[d_model:].float().contiguous()
    tokens, token_probs, probs, confidence = ext.markov_candidates_block(
        top_logits.contiguous(),
        top_cols.contiguous(),
        anchor.long(),
        temperature.float(),
        uniforms.float().contiguous(),
        w1.float().contiguous(),
        w2.float().contiguous(),
        conf_h,
        conf_e,
        scale,
        token_ids,
        columns,
        return_probs,
    )
    return MarkovDraft(
        tokens=tokens,
        token_probs=token_probs,
        probs=probs if return_probs else None,
        confidence=confidence if conf_weight is not None else None,
    )
