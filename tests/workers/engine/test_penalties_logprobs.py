"""Penalties and logprobs stay exact under speculation.

- Penalties (presence, frequency, repetition) apply to the target distribution at every verified
  position with the drafts accepted before it counted as output: greedy speculative decoding equals
  autoregressive decoding with the same penalties (real SmolLM2), and sampled
  speculative output follows the penalized target's exact distribution (test_lossless.py).
- Logprobs: every emitted token — accepted draft, correction or bonus — carries the target's
  log-probability at its position, equal to a teacher-forced forward over the whole output, and the
  same whether decoded speculatively or autoregressively.
"""

from __future__ import annotations

import pytest
import torch
from replay_drafter import ReplayDrafter
from test_lossless import SkewedDrafter
from tiny_models import tiny_hf_model

from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.engine.sampling import (
    ParamError,
    SamplingParams,
    apply_penalties,
    target_logprobs,
)
from specray.workers.engine.sequence import Sequence
from specray.workers.models.loader import load_model

CHATS = ["Repeat the word 'echo' five times.", "List the first five prime numbers."]
MAX_TOKENS = 16
# Every penalty active at once: each changes SmolLM2's greedy output on these prompts.
PENALTIES = {"presence_penalty": 0.4, "frequency_penalty": 0.6, "repetition_penalty": 1.3}


def _reference_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]):
    """vLLM's definitions, one position at a time, written out plainly."""
    logits = logits.clone().float()
    for token in set(prompt) | set(output):
        rp = params.repetition_penalty
        logits[token] = logits[token] / rp if logits[token] > 0 else logits[token] * rp
    for token in set(output):
        logits[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return logits


def test_penalties_count_the_drafts_before_each_position():
    torch.manual_seed(0)
    logits = torch.randn(4, 12) * 3
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.6)
    prompt, output, drafts = [1, 2, 2], [3, 5, 3], [5, 7, 3]
    got = apply_penalties(logits, params, prompt, output, drafts)
    for j in range(4):
        expected = _reference_penalties(logits[j], params, prompt, output + drafts[:j])
        torch.testing.assert_close(got[j], expected)
    assert apply_penalties(logits, SamplingParams(), prompt, output, drafts) is logits, "free when unused"


@pytest.mark.parametrize(
    "field,value",
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("nan")),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
        ("logprobs", True),
    ],
)
def test_bad_values_name_their_field(field, value):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field and field in str(err.value)


@pytest.fixture(scope="module")
def chat_prompts(smollm2):
    engine = LLMEngine(smollm2)
    return [engine.encode_prompt(messages=[{"role": "user", "content": c}]) for c in CHATS]


@pytest.mark.slow
def test_greedy_speculative_with_penalties_equals_autoregressive(smollm2, chat_prompts):
    params = SamplingParams(max_tokens=MAX_TOKENS, logprobs=2, **PENALTIES)
    autoregressive = LLMEngine(smollm2, None, EngineConfig(num_speculative_tokens=0))
    ar = autoregressive.generate(chat_prompts, params)
    plain = autoregressive.generate(chat_prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert all(a.output_ids != p.output_ids for a, p in zip(ar, plain)), "the penalties changed nothing"
    drafter = ReplayDrafter(chat_prompts, [a.output_ids for a in ar])
    spec = LLMEngine(smollm2, drafter, EngineConfig(num_speculative_tokens=5)).generate(chat_prompts, params)
    for a, s in zip(ar, spec):
        assert s.output_ids == a.output_ids
        # The same tokens, verified in steps of up to 6 positions or one at a time: the same logprobs
        # up to the float rounding of a different batch shape.
        assert [lp.token for lp in s.output_logprobs] == s.output_ids
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in s.output_logprobs]),
            torch.tensor([lp.logprob for lp in a.output_logprobs]),
            atol=1e-4,
            rtol=0,
        )
        assert [[t for t, _ in lp.top] for lp in s.output_logprobs] == [
            [t for t, _ in lp.top] for lp in a.output_logprobs
        ]
    accepted = sum(s.stats.accepted_tokens for s in spec)
    assert accepted > MAX_TOKENS and sum(s.stats.draft_tokens for s in spec) > accepted


# ---- logprobs against a teacher-forced forward ------------------------------------------------------
VOCAB = 16
PROMPT = [1, 3, 5, 3, 7]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_logprobs")
    tiny_hf_model("llama", path, vocab_size=VOCAB, seed=5)
    return load_model(str(path))


def _teacher_forced(target, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits of the whole sequence in one forward: [len(prompt) + len(output), V]."""
    runner = ModelRunner(target.model, kv_cache_tokens=256, block_size=4)
    tokens = seq.prompt_ids + seq.output_ids
    return runner.run([ScheduledSequence("tf", tokens, len(tokens))]).logits[0]


def _expected_output_logprobs(logits: torch.Tensor, seq: Sequence) -> list[float]:
    expected = []
    prompt_len = len(seq.prompt_ids)
    for j, token in enumerate(seq.output_ids):
        row = apply_penalties(
            logits[prompt_len - 1 + j : prompt_len + j], seq.params, seq.prompt_ids, seq.output_ids[:j]
        )
        expected.append(float(target_logprobs(row, seq.params)[0, token]))
    return expected


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=12, temperature=1.0, logprobs=3, ignore_eos=True),
        SamplingParams(
            max_tokens=12,
            temperature=0.7,
            top_k=6,
            top_p=0.9,
            logprobs=0,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            repetition_penalty=1.2,
            ignore_eos=True,
        ),
        SamplingParams(max_tokens=12, logprobs=5, repetition_penalty=1.5, ignore_eos=True),
    ],
    ids=["T1", "cuts-and-penalties", "greedy-repetition"],
)
@pytest.mark.parametrize("scheduling", ["fixed", "confidence"])
def test_every_emitted_token_has_the_targets_logprob(tiny_target, params, scheduling):
    from specray.workers.engine.step_curve import StepCurve

    config = EngineConfig(
        num_speculative_tokens=4,
        scheduling=scheduling,
        # A curve that makes a few drafts per step worth it, so the scheduler cuts some segments.
        step_curve=StepCurve((1, 3, 8), (1.0, 0.9, 0.5)) if scheduling == "confidence" else None,
    )
    engine = LLMEngine(tiny_target, SkewedDrafter(VOCAB, 4), config)
    seqs = engine.generate([PROMPT] * 8, [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(8)])
    rejected = sum(s.stats.draft_tokens - s.stats.accepted_tokens for s in seqs)
    accepted = sum(s.stats.accepted_tokens for s in seqs)
    assert rejected and (accepted or params.greedy), "corrections and accepted drafts both occur"
    for seq in seqs:
        assert [lp.token for lp in seq.output_logprobs] == seq.output_ids
        logits = _teacher_forced(tiny_target, seq)
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in seq.output_logprobs]),
            torch.tensor(_expected_output_logprobs(logits, seq)),
            atol=1e-4,
            rtol=0,
        )
        for lp in seq.output_logprobs:
            assert len(lp.top) == params.logprobs
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)
            if lp.top:
                assert lp.logprob <= values[0] + 1e-6
        assert not seq.prompt_logprobs, "prompt logprobs only when asked"


def test_prompt_logprobs_are_the_raw_models(tiny_target):
    params = SamplingParams(max_tokens=3, temperature=0.5, prompt_logprobs=2, ignore_eos=True)
    # Chunked prefill splits the prompt over steps; every chunk brings its own positions.
    engine = LLMEngine(
        tiny_target, None, EngineConfig(num_speculative_tokens=0, max_num_seqs=1, max_num_batched_tokens=3)
    )
    (seq,) = engine.generate([PROMPT], params)
    logits = _teacher_forced(tiny_target, seq)
    raw = logits[: len(PROMPT) - 1].log_softmax(dim=-1)
    assert [lp.token for lp in seq.prompt_logprobs] == PROMPT[1:]
    torch.testing.assert_close(
        torch.tensor([lp.logprob for lp in seq.prompt_logprobs]),
        raw[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])],
        atol=1e-4,
        rtol=0,
    )
    assert [[t for t, _ in lp.top] for lp in seq.prompt_logprobs] == raw.topk(2).indices.tolist()
    assert not seq.output_logprobs
