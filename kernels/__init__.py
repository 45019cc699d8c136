"""The hot operations of a speculative step, one function each.

Each picks the Triton kernel for CUDA tensors when Triton is installed (the `gpu` extra) and the
plain-PyTorch twin otherwise, with the same arguments and results; attention on the CPU runs a
compiled, batch-invariant C++ kernel (`cpu_attention.py`) where a compiler is available, and so do
a layer's row-wise ops (`cpu_rowwise`), and bf16 linear layers on CPUs with AVX-512 BF16 but no
AMX (`cpu_linear.py`). Triton is imported only on the first CUDA call, so a CPU-only install never
needs it.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch

from specray.kernels import acceptance, attention, cpu_attention, cpu_markov, markov_sampling
from specray.kernels.acceptance import accept_greedy, sample_from_probs
from specray.kernels.attention import AttentionMetadata, build_attention_metadata, write_kv
from specray.kernels.cpu_linear import linear
from specray.kernels.markov_sampling import MarkovDraft

__all__ = [
    "AttentionMetadata",
    "MarkovDraft",
    "accept_drafts",
    "accept_greedy",
    "build_attention_metadata",
    "cpu_rowwise",
    "linear",
    "paged_attention",
    "sample_from_probs",
    "sample_markov_block",
    "use_triton",
    "write_kv",
]


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an operation on `tensor` runs the Triton kernel."""
    return tensor.is_cuda and _triton_installed()


def accept_drafts(
    draft_tokens: torch.Tensor,
    num_drafts: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless acceptance over a ragged batch; see `acceptance.accept_drafts` for the contract."""
    if use_triton(target_probs):
        from specray.kernels.triton_acceptance import accept_drafts_triton

        return accept_drafts_triton(draft_tokens, num_drafts, target_probs, draft_probs, greedy, uniforms)
    return acceptance.accept_drafts(draft_tokens, num_drafts, target_probs, draft_probs, greedy, uniforms)


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
    """Draft a block with the Markov head; see `markov_sampling.sample_markov_block` for the contract.
    With `candidates` the block is M columns wide: one C++ call on the CPU (`cpu_markov.py`), small
    work the PyTorch twin does on any other device."""
    args = (
        logits,
        anchor,
        temperature,
        uniforms,
        w1,
        w2,
        hidden,
        conf_weight,
        conf_bias,
        conf_temperature,
        conf_shift,
        return_probs,
        token_ids,
    )
    if candidates:
        if w1 is not None and (ext := markov_sampling.cpu_extension(logits)) is not None:
            return cpu_markov.sample_candidates(ext, *args, candidates)
        return markov_sampling.sample_markov_block(*args, candidates)
    if use_triton(logits):
        from specray.kernels.triton_markov import sample_markov_block_triton

        return sample_markov_block_triton(*args)
    return markov_sampling.sample_markov_block(*args)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of new tokens over the paged cache; see `attention.paged_attention` for the contract."""
    if use_triton(q):
        from specray.kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, meta, scale, sliding_window, softcap)
    if q.device.type == "cpu" and (compiled := cpu_attention.extension()) is not None:
        window, cap = sliding_window or 0, softcap or 0.0
        tables, starts, lens = meta.block_tables, meta.query_start_loc, meta.seq_lens
        return compiled.paged_attention(q, k_cache, v_cache, tables, starts, lens, scale, window, cap)
    return attention.paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)


def cpu_rowwise(*tensors: torch.Tensor) -> ModuleType | None:
    """The compiled row-wise ops (`cpu_rowwise.cpp`: `rms_norm`, `rotary_`, `gated_activation`) where
    they apply to these tensors: on the CPU, one dtype, nothing to differentiate (they have no
    backward); else None, and the caller runs its PyTorch formula."""
    x = tensors[0]
    if x.device.type != "cpu" or any(t.dtype != x.dtype for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return cpu_attention.extension()
