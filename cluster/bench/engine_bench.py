"""`specray bench engine`: autoregressive vs speculative decoding in our engine, and Hugging Face
transformers `generate` (plain and prompt-lookup assisted) on the same model and prompts, in one run.

Every mode decodes the same prompts one at a time (batch 1, greedy), so tokens/s are comparable and
each mode's output can be checked token for token against our autoregressive output. With
`--batch-size N` (repeatable) the same run also measures throughput with N prompts at once
(`engine_throughput.py`), on the CPU or a GPU (`--device`).
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

from specray.cluster.bench import engine_throughput
from specray.defaults import default_drafter
from specray.training.prompt_sets import humaneval_prompts, jsonl_prompts
from specray.workers.drafters.registry import build_drafter, trained_drafter_name
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.dtype import resolve_dtype
from specray.workers.models.loader import DEFAULT_MODEL, LoadedModel, gguf_source, load_model


@dataclass
class ModeResult:
    name: str
    dtype: str
    tokens_per_s: float  # over every round
    tau: float | None
    matches_autoregressive: bool  # token for token, against our autoregressive output in this dtype
    tokens_per_s_by_round: list[float]


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtypes = list(
        dict.fromkeys(str(resolve_dtype(d, device)).removeprefix("torch.") for d in args.dtype or ["auto"])
    )
    batch_sizes = sorted(set(args.batch_size or []))
    wanted = max([args.num_prompts, *batch_sizes])
    prompts = jsonl_prompts(args.prompts, wanted) if args.prompts else humaneval_prompts(wanted)
    params = SamplingParams(max_tokens=args.max_tokens)
    # n-gram lookup, the bundled drafter and the default one (the hybrid of both) for the default model.
    default_drafters = ["ngram"]
    if args.model == DEFAULT_MODEL:
        default_drafters += ["smollm2-135m-dspark", default_drafter(args.model)]
    modes: list[_Mode] = []
    throughput: list[engine_throughput.ThroughputResult] = []
    prompt_ids: list[list[int]] = []
    for dtype in dtypes:
        target = load_model(args.model, dtype, device)
        if not prompt_ids:
            prompt_ids = _encode(target, prompts)
        hf_model = None if args.no_hf else _hf_model(target)
        if not args.only_throughput:
            graphs = not args.no_cuda_graphs
            modes.append(
                _engine_mode(target, "autoregressive", None, params, args.num_speculative_tokens, graphs)
            )
            for name in args.drafter or default_drafters:
                drafter = build_drafter(name, target)
                for scheduling in args.scheduling or ["fixed"]:
                    # Named "<drafter>" under fixed scheduling, "<drafter>/confidence" otherwise.
                    label = mode_name(name) + ("" if scheduling == "fixed" else f"/{scheduling}")
                    modes.append(
                        _engine_mode(
                            target, label, drafter, params, args.num_speculative_tokens, graphs, scheduling
                        )
                    )
            if hf_model is not None:
                modes += _hf_modes(hf_model, target, args.max_tokens)
        if batch_sizes:
            throughput += _throughput(args, target, hf_model, prompt_ids, batch_sizes)
    if not args.no_llama_cpp and not args.only_throughput:
        modes += _llama_cpp_modes(target, args.max_tokens)
    results = _batch_one(modes, prompt_ids[: args.num_prompts], dtypes, args.rounds) if modes else []

    report = {
        "model": args.model,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtypes": dtypes,
        "torch_threads": torch.get_num_threads(),
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "modes": [asdict(r) for r in results],
        "throughput": [asdict(r) for r in throughput],
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    if results:
        _print_table(results)
    if throughput:
        engine_throughput.print_table(throughput)
    _plot(results, throughput, Path(args.json).with_suffix(".png"))
    return 0


def _encode(target: LoadedModel, prompts: list) -> list[list[int]]:
    engine = LLMEngine(
        target, None, EngineConfig(num_speculative_tokens=0, max_num_seqs=1, cuda_graphs=False)
    )
    return [
        engine.encode_prompt(messages=p) if isinstance(p, list) else engine.encode_prompt(prompt=p)
        for p in prompts
    ]


def _batch_one(
    modes: list[_Mode], prompt_ids: list[list[int]], dtypes: list[str], rounds: int = 1
) -> list[ModeResult]:
    """Every mode decodes the prompts one at a time; modes interleaved prompt by prompt, `rounds`
    times over."""
    names = [(m.name, m.dtype) for m in modes]
    if len(set(names)) != len(names):
        raise ValueError(f"two modes share a name (give the drafters distinct names): {names}")
    # Warm every mode up once, then interleave them prompt by prompt, so drift in the machine's
    # load hits all modes alike and the ratios stay meaningful.
    for mode in modes:
        mode.generate(prompt_ids[0][:16])
    outputs: dict[tuple[str, str], list[list[int]]] = {(m.name, m.dtype): [] for m in modes}
    by_round: dict[tuple[str, str], list[float]] = {(m.name, m.dtype): [] for m in modes}
    for round_index in range(rounds):
        elapsed = dict.fromkeys(by_round, 0.0)
        tokens = dict.fromkeys(by_round, 0)
        for ids in tqdm(prompt_ids, desc=f"prompts (round {round_index + 1}/{rounds})"):
            for mode in modes:
                key = (mode.name, mode.dtype)
                start = time.perf_counter()
                out, steps = mode.generate(ids)
                elapsed[key] += time.perf_counter() - start
                tokens[key] += len(out)
                mode.steps += steps
                outputs[key].append(out)
        for key in by_round:
            by_round[key].append(tokens[key] / elapsed[key])
        for mode in modes:
            mode.elapsed += elapsed[(mode.name, mode.dtype)]
            mode.tokens += tokens[(mode.name, mode.dtype)]
    return [
        ModeResult(
            m.name,
            m.dtype,
            m.tokens / m.elapsed,
            m.tokens / m.steps if m.speculative else None,
            outputs[(m.name, m.dtype)] == outputs[("autoregressive", _reference_dtype(m.dtype, dtypes))],
            by_round[(m.name, m.dtype)],
        )
        for m in modes
    ]


def _throughput(
    args: argparse.Namespace,
    target: LoadedModel,
    hf_model,  # noqa: ANN001 - a transformers model or None
    prompt_ids: list[list[int]],
    batch_sizes: list[int],
) -> list[engine_throughput.ThroughputResult]:
    """Our autoregressive engine, each --batch-drafter and HF `generate`."""
    graphs = not args.no_cuda_graphs
    modes = [
        engine_throughput.engine_mode(target, "autoregressive", None, args.num_speculative_tokens, graphs)
    ]
    for name in args.batch_drafter or []:
        modes.append(
            engine_throughput.engine_mode(
                target,
                mode_name(name),
                lambda n=name: build_drafter(n, target),
                args.num_speculative_tokens,
                graphs,
            )
        )
    if hf_model is not None:
        modes.append(engine_throughput.hf_mode(hf_model, target))
    # On a GPU the warm-up decodes as far as the timed run, so every batch shape it meets is captured.
    warmup = args.max_tokens if args.device == "cuda" else min(args.max_tokens, 8)
    return engine_throughput.measure(
        modes, _dtype_name(target), prompt_ids, batch_sizes, args.max_tokens, warmup
    )


@dataclass
class _Mode:
    name: str
    dtype: str
    generate: Callable[[list[int]], tuple[list[int], int]]  # prompt ids -> (output ids, verify steps)
    speculative: bool
    elapsed: float = 0.0
    tokens: int = 0
    steps: int = 0


def mode_name(drafter: str) -> str:
    """A drafter's label: a checkpoint path by its directory's name, a hybrid's keeping its prefix
    (`hybrid:ckpts/dspark` is `hybrid:dspark`, not the same label as `ckpts/dspark`)."""
    block = trained_drafter_name(drafter)
    return drafter.removesuffix(block) + (Path(block).name if "/" in block else block)


def _engine_mode(
    target: LoadedModel,
    name: str,
    drafter,  # noqa: ANN001
    params: SamplingParams,
    num_speculative_tokens: int,
    cuda_graphs: bool,
    scheduling: str = "fixed",
) -> _Mode:
    config = EngineConfig(
        num_speculative_tokens=num_speculative_tokens if drafter else 0,
        max_num_seqs=1,
        cuda_graphs=cuda_graphs,
        scheduling=scheduling if drafter else "fixed",
    )
    engine = LLMEngine(target, drafter, config)

    def generate(ids: list[int]) -> tuple[list[int], int]:
        (seq,) = engine.generate([ids], params)
        return seq.output_ids, seq.stats.verify_steps

    return _Mode(name, _dtype_name(target), generate, speculative=drafter is not None)


def _hf_model(target: LoadedModel):  # noqa: ANN202 - a transformers model
    from transformers import AutoModelForCausalLM

    # The peer runs in our dtype and on our device, so every ratio compares like with like.
    param = next(target.model.parameters())
    return AutoModelForCausalLM.from_pretrained(target.path, dtype=param.dtype).to(param.device).eval()


def _hf_modes(model, target: LoadedModel, max_tokens: int) -> list[_Mode]:  # noqa: ANN001
    pad = (
        target.tokenizer.pad_token_id
        if target.tokenizer.pad_token_id is not None
        else target.stop_token_ids[0]
    )
    common = dict(
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=list(target.stop_token_ids), pad_token_id=pad
    )
    device = next(model.parameters()).device

    def mode(name: str, extra: dict) -> _Mode:
        @torch.inference_mode()
        def generate(ids: list[int]) -> tuple[list[int], int]:
            out = model.generate(torch.tensor([ids], device=device), **common, **extra)[
                0, len(ids) :
            ].tolist()
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
    width = max(22, *(len(r.name) + 2 for r in results))
    first_ar = f"vs {first.dtype} AR"
    # Over several rounds, the range of each round's own ratio to autoregressive: the noise to read
    # the ratios against.
    rounds = len(first.tokens_per_s_by_round) > 1
    ar_rounds = {r.dtype: r.tokens_per_s_by_round for r in results if r.name == "autoregressive"}
    print(
        f"{'mode':<{width}}{'dtype':>10}{'tokens/s':>10}{'vs AR':>8}"
        + (f"{'by round':>13}" if rounds else "")
        + f"{first_ar:>{len(first_ar) + 2}}"
        + (f"{'vs llama.cpp':>14}" if llama else "")
        + f"{'tau':>7}  matches AR"
    )
    for r in results:
        tau = f"{r.tau:.2f}" if r.tau is not None else "-"
        reference = _reference_dtype(r.dtype, dtypes)
        ratios = [t / a for t, a in zip(r.tokens_per_s_by_round, ar_rounds[reference])]
        print(
            f"{r.name:<{width}}{r.dtype:>10}{r.tokens_per_s:>10.1f}"
            f"{r.tokens_per_s / ar[reference]:>8.2f}"
            + (f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>13}" if rounds else "")
            + f"{r.tokens_per_s / first.tokens_per_s:>{len(first_ar) + 2}.2f}"
            + (f"{r.tokens_per_s / llama:>14.2f}" if llama else "")
            + f"{tau:>7}  {r.matches_autoregressive}"
        )


def _plot(
    results: list[ModeResult], throughput: list[engine_throughput.ThroughputResult], path: Path
) -> None:
    """Batch-1 tokens/s per mode (bars), then throughput against batch size (lines), as run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (1 if results else 0) + (2 if throughput else 0)
    panel_width = max(6.0, 0.8 * len({r.name for r in results}))  # room for every mode's label
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(panel_width * max(panels, 1), 5.5), squeeze=False)
    axes = list(axes[0])
    if results:
        _plot_batch_one(axes.pop(0), results)
    if throughput:
        engine_throughput.plot(axes, throughput)
    fig.suptitle("specray bench engine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_batch_one(ax, results: list[ModeResult]) -> None:  # noqa: ANN001 - a matplotlib axis
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    names = list(dict.fromkeys(r.name for r in results))
    width = 0.8 / len(dtypes)
    for i, dtype in enumerate(dtypes):
        rows = {r.name: r.tokens_per_s for r in results if r.dtype == dtype}
        xs = [n + (i - (len(dtypes) - 1) / 2) * width for n in range(len(names))]
        ax.bar(xs, [rows.get(name, 0.0) for name in names], width, label=dtype, color=f"C{i}")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title("one prompt at a time")
    ax.legend(title="dtype")
