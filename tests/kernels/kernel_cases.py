"""Random ragged inputs for the kernel tests, shared by the equality tests and the sm_90 compile check."""

from __future__ import annotations

import torch

from specray.kernels.attention import AttentionMetadata, build_attention_metadata

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def acceptance_inputs(
    batch: int,
    num_slots: int,
    vocab: int,
    dtype: torch.dtype,
    seed: int,
    with_draft_probs: bool = True,
    num_drafts: list[int] | None = None,
    accept: str = "mixed",
    device: str = "cpu",
) -> dict:
    """Arguments of `accept_drafts`; `accept` steers the outcome: "mixed", "all" or "none"."""
    g = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(batch, num_slots + 1, vocab, generator=g) * 3, dim=-1)
    draft = torch.softmax(torch.randn(batch, num_slots, vocab, generator=g) * 3, dim=-1)
    tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=g).view(batch, num_slots)
    greedy = torch.arange(batch) % 2 == 0
    uniforms = torch.rand(batch, num_slots + 1, generator=g)
    argmax = target[:, :num_slots].argmax(dim=-1)
    if accept == "all":
        # Greedy rows draft the argmax; sampled rows draft from p_d = p_t, where min(1, p_t/p_d) = 1.
        draft = target[:, :num_slots].clone()
        tokens = torch.where(greedy.unsqueeze(1), argmax, tokens)
        uniforms[:, :num_slots] = 0.0
    elif accept == "none":
        tokens = torch.where(greedy.unsqueeze(1), (argmax + 1) % vocab, tokens)
        uniforms[:, :num_slots] = 1.0 - 1e-7
        draft.scatter_(2, tokens.unsqueeze(-1), 1.0)
    else:
        # Half the greedy drafts hit the argmax so that greedy rows accept some.
        hit = torch.rand(batch, num_slots, generator=g) < 0.7
        tokens = torch.where(greedy.unsqueeze(1) & hit, argmax, tokens)
    if num_drafts is None:
        lengths = torch.randint(0, num_slots + 1, (batch,), generator=g)
    else:
        lengths = torch.tensor(num_drafts)
    # Padding past num_drafts is -1, as the engine sends it.
    tokens = torch.where(torch.arange(num_slots).unsqueeze(0) < lengths.unsqueeze(1), tokens, -1)
    return {
        "draft_tokens": tokens.to(device),
        "num_drafts": lengths.to(device),
        "target_probs": target.to(dtype).to(device),
        "draft_probs": draft.to(dtype).to(device) if with_draft_probs else None,
        "greedy": greedy.to(device),
        "uniforms": uniforms.to(device),
    }


def markov_inputs(
    batch: int,
    num_slots: int,
    vocab: int,
    rank: int,
    d_model: int,
    dtype: torch.dtype,
    seed: int,
    with_conf: bool = True,
    device: str = "cpu",
) -> dict:
    """Arguments of `sample_markov_block` (rank 0 = no Markov head); rows alternate greedy and sampled."""
    g = torch.Generator().manual_seed(seed)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.arange(batch) % 4]
    args = {
        "logits": (torch.randn(batch, num_slots, vocab, generator=g) * 2).to(dtype).to(device),
        "anchor": torch.randint(0, vocab, (batch,), generator=g).to(device),
        "temperature": temperature.to(device),
        "uniforms": torch.rand(batch, num_slots, generator=g).to(device),
    }
    if rank:
        args["w1"] = (torch.randn(vocab, rank, generator=g) * 0.5).to(dtype).to(device)
        args["w2"] = (torch.randn(vocab, rank, generator=g) * 0.5).to(dtype).to(device)
    if with_conf:
        args["hidden"] = torch.randn(batch, num_slots, d_model, generator=g).to(dtype).to(device)
        args["conf_weight"] = (torch.randn(d_model + rank, generator=g) * 0.2).to(dtype).to(device)
        args["conf_bias"] = 0.25
        args["conf_temperature"] = torch.linspace(1.0, 2.0, num_slots).to(device)
        args["conf_shift"] = torch.linspace(-0.6, 0.4, num_slots).to(device)  # non-zero at every slot
    return args


def attention_inputs(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(q, k_cache, v_cache, meta) with each sequence's pages scattered over a shuffled cache."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-s // block_size) for s in seq_lens]
    max_pages = max(pages)
    num_blocks = sum(pages) + 3
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[used : used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(dtype).to(device)
    meta = build_attention_metadata(table.to(device), query_lens, seq_lens, block_size)
    return q, k_cache, v_cache, meta


def launch_every_kernel() -> None:
    """Run each Triton wrapper over the specialisations an engine reaches on a GPU (the compile check).

    Probabilities in fp32 and weights, caches and activations in bf16, plus one fp32 attention for a
    model served in full precision; the half-precision paths differ from bf16 only in the dot's type.
    """
    from specray.kernels.triton_acceptance import accept_drafts_triton
    from specray.kernels.triton_attention import paged_attention_triton
    from specray.kernels.triton_markov import sample_markov_block_triton

    for with_draft_probs in (True, False):
        accept_drafts_triton(**acceptance_inputs(3, 4, 100, torch.float32, 0, with_draft_probs))
    sample_markov_block_triton(**markov_inputs(3, 4, 100, 24, 32, torch.bfloat16, 0), return_probs=True)
    sample_markov_block_triton(**markov_inputs(40, 4, 100, 24, 32, torch.bfloat16, 0))
    sample_markov_block_triton(**markov_inputs(3, 4, 100, 0, 32, torch.bfloat16, 0, with_conf=False))
    # (heads, kv heads, head dim, window, softcap, splits, dtype): SmolLM2, Qwen3-8B, Gemma 3, tiny.
    for heads, kv_heads, head_dim, window, softcap, splits, dtype in (
        (9, 3, 64, None, None, 1, torch.bfloat16),
        (32, 8, 128, None, None, 4, torch.bfloat16),
        (4, 1, 256, 16, 30.0, 1, torch.bfloat16),
        (9, 3, 64, None, None, 1, torch.float32),
        (4, 2, 8, None, None, 1, torch.float32),  # head dim below tl.dot's minimum K of 16
    ):
        q, k_cache, v_cache, meta = attention_inputs([8, 1], [40, 9], heads, kv_heads, head_dim, 16, dtype, 0)
        paged_attention_triton(q, k_cache, v_cache, meta, head_dim**-0.5, window, softcap, num_splits=splits)
