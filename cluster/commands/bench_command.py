"""`specray bench <what>`: benchmarks that report ratios measured in one run."""

from __future__ import annotations

import argparse

from specray.cluster.commands.cli import add_commands
from specray.defaults import DEFAULT_MODEL
from specray.workers.models.dtype import DTYPE_CHOICES

# name → ("module:function" adding the benchmark's arguments, one-line help)
BENCHMARKS = {
    "engine": (f"{__name__}:register_engine", "our engine (AR, speculative) vs HF generate, one run"),
    "drafting": (f"{__name__}:register_drafting", "a drafter's proposal vs a target decode step, one run"),
    "kernels": (f"{__name__}:register_kernels", "Triton kernels vs their PyTorch twins (GPU)"),
    "serve": (
        "specray.cluster.bench.serve_bench:register",
        "the cluster under load: autoregressive, fixed-γ and confidence-scheduled, one run",
    ),
}


def register(parser: argparse.ArgumentParser) -> None:
    add_commands(parser, BENCHMARKS, "bench")


def register_engine(p: argparse.ArgumentParser) -> None:
    # The arguments live here, not in engine_bench, whose import loads torch and transformers.
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompts", default=None, help="JSONL of {prompt} or {messages}; default: HumanEval")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="decode the prompts this many times, modes interleaved; tokens/s is over all rounds and "
        "the table shows each round's ratio to autoregressive (the noise of a shared machine)",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=5)
    p.add_argument(
        "--drafter",
        action="append",
        default=None,
        help="speculative mode(s); default: ngram, plus for the default model its bundled trained drafter "
        "and the default drafter (the hybrid of both)",
    )
    p.add_argument(
        "--scheduling",
        action="append",
        choices=("fixed", "confidence"),
        default=None,
        help="how many drafts each speculative mode verifies per step: all γ (fixed) or DSpark "
        "Algorithm 1 over the step curve (confidence); repeat for both (default: fixed)",
    )
    p.add_argument(
        "--dtype",
        action="append",
        choices=DTYPE_CHOICES,
        default=None,
        help="run every mode in this dtype (repeat for several; default: auto)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where every mode runs (cuda: dtype auto is bf16, our decode/verify steps replay CUDA graphs)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        action="append",
        default=None,
        help="also measure throughput with this many prompts at once (repeat for several): our "
        "autoregressive engine, each --batch-drafter, and HF generate on one left-padded batch",
    )
    p.add_argument(
        "--batch-drafter",
        action="append",
        default=None,
        help="a speculative mode of the throughput measurement (repeat for several; default: none)",
    )
    p.add_argument(
        "--only-throughput",
        action="store_true",
        help="skip the batch-1 table (every mode, one prompt at a time); needs --batch-size",
    )
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on cuda, run our decode and verify steps eagerly instead of replaying CUDA graphs",
    )
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers peer")
    p.add_argument(
        "--no-llama-cpp",
        action="store_true",
        help="skip the llama.cpp peer (runs only where the bench-peers extra is installed)",
    )
    p.add_argument("--json", required=True, help="where to write the results (a PNG goes beside it)")
    p.set_defaults(func=_run_engine)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _run_engine(args: argparse.Namespace) -> int:
    if args.only_throughput and not args.batch_size:
        raise ValueError("--only-throughput needs at least one --batch-size")
    from specray.cluster.bench.engine_bench import run

    return run(args)


def register_drafting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--drafter",
        action="append",
        required=True,
        help="a drafter (bundled name, checkpoint directory or ngram); repeatable",
    )
    p.add_argument("--batch", type=int, action="append", help="batch size(s) (default: 1 and 8)")
    p.add_argument(
        "--temperature", type=float, action="append", help="draft temperature(s) (default: 0 and 1)"
    )
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=7)
    p.add_argument("--repetitions", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time (with --threads 1, robust to a busy machine)",
    )
    p.add_argument("--dtype", action="append", choices=DTYPE_CHOICES, default=None, help="(default: auto)")
    p.add_argument("--json", required=True, help="where to write the results (a PNG goes beside it)")
    p.set_defaults(func=_run_drafting)


def _run_drafting(args: argparse.Namespace) -> int:
    from specray.cluster.bench.drafting_bench import run

    args.batch = args.batch or [1, 8]
    args.temperature = args.temperature or [0.0, 1.0]
    return run(args)


class _ThisParser:
    """Hands `kernels.bench`'s registrar, which adds its own sub-parser, the one already made here."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        return self.parser


def register_kernels(parser: argparse.ArgumentParser) -> None:
    # Imported only when chosen: that module loads torch at import.
    from specray.kernels.bench import add_bench_kernels_parser

    add_bench_kernels_parser(_ThisParser(parser))
