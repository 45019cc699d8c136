"""Tiny random models: Hugging Face checkpoints of each family written to disk for parity tests, and
a tiny random target fast enough for every drafter and training test."""

from __future__ import annotations

from pathlib import Path

import torch

from specray.workers.models.config import ModelConfig, RopeConfig
from specray.workers.models.decoder import DecoderModel
from specray.workers.models.loader import LoadedModel

TINY_VOCAB = 96


def tiny_hf_model(family: str, path: Path, vocab_size: int = 96, seed: int = 0):
    """Build a random HF model of the family, save it as a checkpoint at `path`, return it."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        config = LlamaConfig(**common, rope_theta=10_000.0, tie_word_embeddings=False)
    elif family == "qwen3":
        config = Qwen3Config(**common, rope_theta=1_000_000.0, tie_word_embeddings=True)
    elif family == "gemma3":
        # A window of 5 with prompts longer than that makes the sliding layers matter; softcapping on.
        config = Gemma3TextConfig(
            **common,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=16,
            final_logit_softcapping=30.0,
            rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0,
        )
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Gemma's norms start at zero offsets; randomise them so the (1 + w) convention is exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    _write_tokenizer(path, vocab_size)
    return model


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the tiny vocabulary, so the checkpoint is a complete HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(path)


def make_tiny_target(seed: int = 0, vocab_size: int = TINY_VOCAB, embed_scale: float = 8.0) -> LoadedModel:
    config = ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        rope=RopeConfig(theta=10_000.0),
        eos_token_ids=(1,),
    )
    torch.manual_seed(seed)
    model = DecoderModel(config)
    # Peaked logits (the default scale) make greedy decoding stable and drafts sometimes right.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embed_scale)
    return LoadedModel(model.eval(), config, None, Path("."), (1,))
