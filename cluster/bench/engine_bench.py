"""`specray bench engine`: autoregressive vs speculative decoding in our engine, and Hugging Face
transformers `generate` (plain and prompt-lookup assisted) on the same model and prompts, in one run.

Every mode decodes the same prompts one at a time (batch 1, greedy), so tokens/s are comparable and
each mode's output can be checked token for token against our autoregressive output.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specray.training.prompt_sets import humaneval_prompts, jsonl_prompts
from specray.workers.drafters.registry import build_drafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.loader import DEFAULT_MODEL, LoadedModel, load_model


@dataclass
class ModeResult:
    name: str
    tokens_per_s: float
    tau: float | None
    matches_autoregressive: bool


def run(args: argparse.Namespace) -> int:
    target = load_model(args.model)
    prompts = (
        jsonl_prompts(args.prompts, args.num_prompts) if args.prompts else humaneval_prompts(args.num_prompts)
    )
    tokenizer_engine = LLMEngine(target, None, EngineConfig(num_speculative_tokens=0, max_num_seqs=1))
    prompt_ids = [
        tokenizer_engine.encode_prompt(messages=p)
        if isinstance(p, list)
        else tokenizer_engine.encode_prompt(prompt=p)
        for p in prompts
    ]
    params = SamplingParams(max_tokens=args.max_tokens)

    default_drafters = ["ngram", "smollm2-135m-dspark"] if args.model == DEFAULT_MODEL else ["ngram"]
    modes = [_engine_mode(target, "autoregressive", None, params, args.num_speculative_tokens)]
    for name in args.drafter or default_drafters:
        drafter = build_drafter(name, target)
        modes.append(_engine_mode(target, _mode_name(name), drafter, params, args.num_speculative_tokens))
    if not args.no_hf:
        modes += _hf_modes(target, args.max_tokens)

    # Warm every mode up once, then interleave them prompt by prompt, so drift in the machine's
    # load hits all modes alike and the ratios stay meaningful.
    for mode in modes:
        mode.generate(prompt_ids[0][:16])
    outputs: dict[str, list[list[int]]] = {m.name: [] for m in modes}
    for ids in tqdm(prompt_ids, desc="prompts"):
        for mode in modes:
            start = time.perf_counter()
            out, steps = mode.generate(ids)
            mode.elapsed += time.perf_counter() - start
            mode.tokens += len(out)
            mode.steps += steps
            outputs[mode.name].append(out)
    reference = outputs["autoregressive"]
    results = [
        ModeResult(
            m.name,
            m.tokens / m.elapsed,
            m.tokens / m.steps if m.speculative else None,
            outputs[m.name] == reference,
        )
        for m in modes
    ]

    report = {
        "model": args.model,
        "device": "cpu",
        "dtype": "float32",
        "num_prompts": len(prompt_ids),
        "max_tokens": args.max_tokens,
        "modes": [asdict(r) for r in results],
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    _print_table(results)
    _plot(results, Path(args.json).with_suffix(".png"))
    return 0


@dataclass
class _Mode:
    name: str
    generate: Callable[[list[int]], tuple[list[int], int]]  # prompt ids -> (output ids, verify steps)
    speculative: bool
    elapsed: float = 0.0
    tokens: int = 0
    steps: int = 0


def _mode_name(drafter: str) -> str:
    return Path(drafter).name if "/" in drafter else drafter


def _engine_mode(
    target: LoadedModel, name: str, drafter, params: SamplingParams, num_speculative_tokens: int
) -> _Mode:  # noqa: ANN001
    engine = LLMEngine(
        target,
        drafter,
        EngineConfig(num_speculative_tokens=num_speculative_tokens if drafter else 0, max_num_seqs=1),
    )

    def generate(ids: list[int]) -> tuple[list[int], int]:
        (seq,) = engine.generate([ids], params)
        return seq.output_ids, seq.stats.verify_steps

    return _Mode(name, generate, speculative=drafter is not None)


def _hf_modes(target: LoadedModel, max_tokens: int) -> list[_Mode]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target.path, dtype=torch.float32).eval()
    pad = (
        target.tokenizer.pad_token_id
        if target.tokenizer.pad_token_id is not None
        else target.stop_token_ids[0]
    )
    common = dict(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(target.stop_token_ids), pad_token_id=pad
    )

    def mode(name: str, extra: dict) -> _Mode:
        @torch.inference_mode()
        def generate(ids: list[int]) -> tuple[list[int], int]:
            out = model.generate(torch.tensor([ids]), **common, **extra)[0, len(ids) :].tolist()
            return out, 0

        return _Mode(name, generate, speculative=False)

    return [mode("hf_generate", {}), mode("hf_prompt_lookup", {"prompt_lookup_num_tokens": 5})]


def _print_table(results: list[ModeResult]) -> None:
    base = results[0].tokens_per_s
    print(f"{'mode':<22}{'tokens/s':>10}{'vs AR':>8}{'tau':>7}  matches AR")
    for r in results:
        tau = f"{r.tau:.2f}" if r.tau is not None else "-"
        print(
            f"{r.name:<22}{r.tokens_per_s:>10.1f}{r.tokens_per_s / base:>8.2f}{tau:>7}  {r.matches_autoregressive}"
        )


def _plot(results: list[ModeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r.name for r in results], [r.tokens_per_s for r in results], color="tab:blue")
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title("specray bench engine")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
