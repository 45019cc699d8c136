"""Our decoder's logits equal Hugging Face transformers' on the same weights, per family, through
the paged KV cache (prefill, decode and multi-token verify steps) and in ragged batches."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_hf_model

from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.models.loader import load_model

# fp32 on CPU: differences come only from summation order.
ATOL = 2e-4


def _hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def family_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = tiny_hf_model(request.param, path)
    return request.param, hf_model, load_model(str(path), "float32")


def test_family_switches_follow_the_checkpoint(family_pair):
    family, _, ours = family_pair
    assert ours.config.family == family
    assert ours.config.qk_norm == (family != "llama")
    assert ours.config.sandwich_norm == (family == "gemma3")


def test_prefill_logits_match_hf(family_pair):
    family, hf_model, ours = family_pair
    ids = [1, 5, 9, 33, 17, 4, 80, 12, 7, 61, 22, 3]
    runner = ModelRunner(ours.model, kv_cache_tokens=256, block_size=4)
    out = runner.run([ScheduledSequence("s", ids, len(ids))])
    diff = (out.logits[0] - _hf_logits(hf_model, ids)).abs().max().item()
    assert diff < ATOL, f"{family}: prefill logits differ from transformers by {diff}"


def test_cached_decode_and_verify_steps_match_hf(family_pair):
    """Prefill in chunks, decode one token, verify three at once, roll back two: every step's logits
    equal a full forward over the same prefix."""
    family, hf_model, ours = family_pair
    ids = [1, 5, 9, 33, 17, 4, 80, 12, 7, 61, 22, 3, 44, 45, 46]
    runner = ModelRunner(ours.model, kv_cache_tokens=256, block_size=4)
    runner.run([ScheduledSequence("s", ids[:5], 0)])
    out = runner.run([ScheduledSequence("s", ids[5:9], 1)])
    full = _hf_logits(hf_model, ids)
    assert (out.logits[0][0] - full[8]).abs().max() < ATOL, f"{family}: chunked prefill"
    out = runner.run([ScheduledSequence("s", ids[9:10], 1)])
    assert (out.logits[0][0] - full[9]).abs().max() < ATOL, f"{family}: one-token decode"
    out = runner.run([ScheduledSequence("s", ids[10:13], 3)])
    assert (out.logits[0] - full[10:13]).abs().max() < ATOL, f"{family}: multi-token verify"
    runner.rollback("s", 11)  # reject the last two of the three
    out = runner.run([ScheduledSequence("s", ids[11:15], 4)])
    assert (out.logits[0] - full[11:15]).abs().max() < ATOL, f"{family}: after rollback"


def test_ragged_batch_equals_one_sequence_at_a_time(family_pair):
    family, _, ours = family_pair
    prompts = {"a": [1, 7, 8, 9, 10, 11, 12, 13, 14], "b": [1, 40, 41], "c": [1, 50, 51, 52, 53, 54]}
    single = {}
    for name, ids in prompts.items():
        runner = ModelRunner(ours.model, kv_cache_tokens=256, block_size=4)
        runner.run([ScheduledSequence(name, ids[:-2], 0)])
        single[name] = runner.run([ScheduledSequence(name, ids[-2:], 2)]).logits[0]
    batched = ModelRunner(ours.model, kv_cache_tokens=256, block_size=4)
    # Mixed phases in one forward: a continues (2 tokens), b prefills whole, c prefills whole.
    batched.run([ScheduledSequence("a", prompts["a"][:-2], 0)])
    out = batched.run(
        [
            ScheduledSequence("a", prompts["a"][-2:], 2),
            ScheduledSequence("b", prompts["b"], 2),
            ScheduledSequence("c", prompts["c"], 2),
        ]
    )
    for logits, name in zip(out.logits, ["a", "b", "c"]):
        diff = (logits - single[name]).abs().max().item()
        assert diff < ATOL, f"{family}: sequence {name} differs by {diff} when batched"


def test_feature_layers_are_the_decoder_layer_outputs(family_pair):
    family, hf_model, ours = family_pair
    ids = [1, 5, 9, 33, 17, 4]
    runner = ModelRunner(ours.model, kv_cache_tokens=64, block_size=4, feature_layers=(0, 2))
    out = runner.run([ScheduledSequence("s", ids, 1)], return_final_hidden=True)
    with torch.no_grad():
        hidden = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[1][0], hidden[3][0]], dim=-1)
    assert out.features[0].shape == (len(ids), 2 * ours.config.hidden_size)
    assert (out.features[0] - expected).abs().max() < ATOL, f"{family}: features are not layers 0 and 2"
    assert (out.final_hidden[0] - hidden[-1][0]).abs().max() < ATOL, f"{family}: final hidden state"


@pytest.mark.slow
def test_real_smollm2_logits_match_hf(smollm2):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog because")["input_ids"]
    out = ModelRunner(smollm2.model, kv_cache_tokens=256).run([ScheduledSequence("s", ids, len(ids))])
    diff = (out.logits[0] - _hf_logits(hf_model, ids)).abs().max().item()
    assert diff < ATOL, f"SmolLM2 logits differ from transformers by {diff}"


@pytest.mark.slow
def test_packaged_gemma3_270m_loads_and_matches_hf():
    from transformers import AutoModelForCausalLM

    gemma = load_model("gemma3-270m", "float32")
    assert gemma.config.family == "gemma3" and "sliding_attention" in gemma.config.layer_types
    hf_model = AutoModelForCausalLM.from_pretrained(gemma.path, dtype=torch.float32).eval()
    ids = gemma.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a primary colour."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    out = ModelRunner(gemma.model, kv_cache_tokens=256).run([ScheduledSequence("s", list(ids), len(ids))])
    diff = (out.logits[0] - _hf_logits(hf_model, list(ids))).abs().max().item()
    assert diff < 1e-3, f"Gemma 3 270M logits differ from transformers by {diff}"
