"""`specray profile`: measure (or read from the cache) the verifier's step curve SPS(B) and show it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from specray.defaults import DEFAULT_MODEL
from specray.workers.models.dtype import DTYPE_CHOICES

if TYPE_CHECKING:
    from specray.workers.engine.step_curve import StepCurve


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-tokens-per-batch", type=int, default=128)
    p.add_argument(
        "--dtype",
        action="append",
        choices=DTYPE_CHOICES,
        default=None,
        help="profile in this dtype (repeat for several; default: float32, and bfloat16 where the CPU has it)",
    )
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

    from specray.kernels.cpu_features import has_bf16
    from specray.workers.engine.step_curve import load_or_profile
    from specray.workers.models.loader import load_model

    default = ["float32", "bfloat16"] if has_bf16() or args.device != "cpu" else ["float32"]
    curves: dict[str, StepCurve] = {}
    for dtype in dict.fromkeys(args.dtype or default):
        target = load_model(args.model, dtype, args.device)
        name = str(next(target.model.parameters()).dtype).removeprefix("torch.")
        threads = torch.get_num_threads()
        torch.set_num_threads(args.torch_threads)
        try:
            curves[name] = load_or_profile(target.model, args.model, args.max_tokens_per_batch, args.refresh)
        finally:
            torch.set_num_threads(threads)  # as it was, for a caller in the same process
    names = list(curves)
    first = curves[names[0]]
    print(f"{'batch tokens':>12}" + "".join(f"  {n + ' steps/s':>18}  {'tokens/s':>9}" for n in names))
    for b in first.batch_tokens:
        cells = "".join(f"  {curves[n].sps(b):>18.2f}  {b * curves[n].sps(b):>9.1f}" for n in names)
        print(f"{b:>12}{cells}")
    if args.png:
        _plot(curves, args.model, args.torch_threads, args.png)
    return 0


def _plot(curves: dict[str, StepCurve], model: str, threads: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (dtype, curve) in enumerate(curves.items()):
        ax.plot(curve.batch_tokens, curve.steps_per_s, marker="o", color=f"C{i}", label=dtype)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch tokens B")
    ax.set_ylabel("target steps/s SPS(B)")
    ax.set_title(f"step curve: {model}, {threads} thread(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="dtype")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
