"""`specray profile`: measure (or read from the cache) the verifier's step curve SPS(B) and show it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from specray.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from specray.workers.engine.step_curve import StepCurve

_DTYPES = ("float32", "bfloat16", "float16")


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-tokens-per-batch", type=int, default=128)
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="CPU threads, as the verifier runs (verifiers.torch_threads)",
    )
    p.add_argument("--refresh", action="store_true", help="profile again even if a cached curve exists")
    p.add_argument("--png", type=Path, help="plot the curve here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from specray.workers.engine.step_curve import load_or_profile
    from specray.workers.models.loader import load_model

    target = load_model(args.model, getattr(torch, args.dtype), args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        curve = load_or_profile(target.model, args.model, args.max_tokens_per_batch, args.refresh)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process
    print(f"{'batch tokens':>12}  {'steps/s':>9}  {'tokens/s':>9}")
    for b, sps in zip(curve.batch_tokens, curve.steps_per_s):
        print(f"{b:>12}  {sps:>9.2f}  {b * sps:>9.1f}")
    if args.png:
        _plot(curve, args.model, args.png)
    return 0


def _plot(curve: StepCurve, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve.batch_tokens, curve.steps_per_s, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch tokens B")
    ax.set_ylabel("target steps/s SPS(B)")
    ax.set_title(f"step curve: {model}")
    ax.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
