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
from specray.workers.models.dtype import resolve_dtype
from specray.workers.models.loader import DEFAULT_MODEL, LoadedModel, gguf_source, load_model


@dataclass
class ModeResult:
    name: str
    dtype: str
    tokens_per_s: float
    tau: float | None
    matches_autoregressive: bool  # token for token, against our autoregressive output in this dtype


def run(args: argparse.Namespace) -> int:
    dtypes = list(dict.fromkeys(str(resolve_dtype(d)).removeprefix("torch.") for d in args.dtype or ["auto"]))
    prompts = (
        jsonl_prompts(args.prompts, args.num_prompts) if args.prompts else humaneval_prompts(args.num_prompts)
    )
    params = SamplingParams(max_tokens=args.max_tokens)
    default_drafters = ["ngram", "smollm2-135m-dspark"] if args.model == DEFAULT_MODEL else ["ngram"]
    modes: list[_Mode] = []
    for dtype in dtypes:
        target = load_model(args.model, dtype)
        modes.append(_engine_mode(target, "autoregressive", None, params, args.num_speculative_tokens))
        for name in args.drafter or default_drafters:
            drafter = build_drafter(name, target)
            modes.append(_engine_mode(target, _mode_name(name), drafter, params, args.num_speculative_tokens))
        if not args.no_hf:
            modes += _hf_modes(target, args.max_tokens)
    if not args.no_llama_cpp:
        modes += _llama_cpp_modes(target, args.max_tokens)
    tokenizer_engine = LLMEngine(target, None, EngineConfig(num_speculative_tokens=0, max_num_seqs=1))
    prompt_ids = [
        tokenizer_engine.encode_prompt(messages=p)
        if isinstance(p, list)
        else tokenizer_engine.encode_prompt(prompt=p)
        for p in prompts
    ]

    # Warm every mode up once, then interleave them prompt by prompt, so drift in the machine's
    # load hits all modes alike and the ratios stay meaningful.
    for mode in modes:
        mode.generate(prompt_ids[0][:16])
    outputs: dict[tuple[str, str], list[list[int]]] = {(m.name, m.dtype): [] for m in modes}
    for ids in tqdm(prompt_ids, desc="prompts"):
        for mode in modes:
            start = time.perf_counter()
            out, steps = mode.generate(ids)
            mode.elapsed += time.perf_counter() - start
            mode.tokens += len(out)
            mode.steps += steps
            outputs[(mode.name, mode.dtype)].append(out)
    results = [
        ModeResult(
            m.name,
            m.dtype,
            m.tokens / m.elapsed,
            m.tokens / m.steps if m.speculative else None,
            outputs[(m.name, m.dtype)] == outputs[("autoregressive", _reference_dtype(m.dtype, dtypes))],
        )
        for m in modes
    ]

    report = {
        "model": args.model,
        "device": "cpu",
        "dtypes": dtypes,
        "torch_threads": torch.get_num_threads(),
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
    dtype: str
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

    return _Mode(name, _dtype_name(target), generate, speculative=drafter is not None)


def _hf_modes(target: LoadedModel, max_tokens: int) -> list[_Mode]:
    from transformers import AutoModelForCausalLM

    # The peer runs in our dtype, so every ratio compares like with like.
    dtype = next(target.model.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(target.path, dtype=dtype).eval()
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

        return _Mode(name, _dtype_name(target), generate, speculative=False)

    return [mode("hf_generate", {}), mode("hf_prompt_lookup", {"prompt_lookup_num_tokens": 5})]


def _llama_cpp_modes(target: LoadedModel, max_tokens: int) -> list[_Mode]:
    """llama.cpp's plain greedy decoding of the GGUF our model was converted from: the CPU peer users
    would pick instead. Optional (the `bench-peers` extra); its weights stay quantized, so its text
    may differ from ours."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print(
            "llama.cpp peer skipped: llama-cpp-python is not installed (pip install 'specray[bench-peers]')"
        )
        return []
    gguf = gguf_source(target.path)
    if gguf is None:
        print(f"llama.cpp peer skipped: {target.path} was not converted from a GGUF file")
        return []
    model = Llama(str(gguf), n_ctx=4096, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
    stops = set(target.stop_token_ids)

    def generate(ids: list[int]) -> tuple[list[int], int]:
        out: list[int] = []
        for token in model.generate(ids, top_k=1, temp=0.0, reset=True):
            if token in stops:
                break
            out.append(token)
            if len(out) == max_tokens:
                break
        return out, 0

    return [_Mode("llama_cpp", LLAMA_CPP_DTYPE, generate, speculative=False)]


# The peer decodes the GGUF's own quantized weights.
LLAMA_CPP_DTYPE = "gguf"


def _reference_dtype(dtype: str, dtypes: list[str]) -> str:
    """Whose autoregressive output a mode is checked against: its own dtype's, else the first's."""
    return dtype if dtype in dtypes else dtypes[0]


def _dtype_name(target: LoadedModel) -> str:
    return str(next(target.model.parameters()).dtype).removeprefix("torch.")


def _print_table(results: list[ModeResult]) -> None:
    """Each mode against our autoregressive decoding in the same dtype, and against the first row."""
    ar = {r.dtype: r.tokens_per_s for r in results if r.name == "autoregressive"}
    dtypes = list(ar)
    first = results[0]
    llama = next((r.tokens_per_s for r in results if r.name == "llama_cpp"), None)
    print(
        f"{'mode':<22}{'dtype':>10}{'tokens/s':>10}{'vs AR':>8}{'vs ' + first.dtype[:4] + ' AR':>12}"
        + (f"{'vs llama.cpp':>14}" if llama else "")
        + f"{'tau':>7}  matches AR"
    )
    for r in results:
        tau = f"{r.tau:.2f}" if r.tau is not None else "-"
        print(
            f"{r.name:<22}{r.dtype:>10}{r.tokens_per_s:>10.1f}"
            f"{r.tokens_per_s / ar[_reference_dtype(r.dtype, dtypes)]:>8.2f}"
            f"{r.tokens_per_s / first.tokens_per_s:>12.2f}"
            + (f"{r.tokens_per_s / llama:>14.2f}" if llama else "")
            + f"{tau:>7}  {r.matches_autoregressive}"
        )


def _plot(results: list[ModeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r.dtype for r in results))
    names = list(dict.fromkeys(r.name for r in results))
    width = 0.8 / len(dtypes)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, dtype in enumerate(dtypes):
        rows = {r.name: r.tokens_per_s for r in results if r.dtype == dtype}
        xs = [n + (i - (len(dtypes) - 1) / 2) * width for n in range(len(names))]
        ax.bar(xs, [rows.get(name, 0.0) for name in names], width, label=dtype, color=f"C{i}")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title("specray bench engine")
    ax.legend(title="dtype")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
