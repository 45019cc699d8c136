"""`specray eval drafter`: τ and acceptance by position of drafters through the engine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specray.cluster.commands.cli import add_commands
from specray.defaults import DEFAULT_MODEL
from specray.workers.models.dtype import DTYPE_CHOICES


def register(p: argparse.ArgumentParser) -> None:
    add_commands(
        p,
        {
            "drafter": (
                f"{__name__}:register_drafter",
                "τ (tokens per verify step) and acceptance by position",
            )
        },
        "what",
    )


def register_drafter(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--drafter", action="append", required=True, help="ngram or a checkpoint directory; repeatable"
    )
    d.add_argument("--label", action="append", default=[], help="a name per --drafter for the report")
    d.add_argument("--target", default=DEFAULT_MODEL)
    d.add_argument("--dataset", default="sharegpt-heldout", help="sharegpt-heldout, humaneval or FILE.jsonl")
    d.add_argument("--num-prompts", type=int, default=16)
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--num-speculative-tokens", "-k", type=int, default=7)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 where fast, else fp32")
    d.add_argument("--json", type=Path, required=True, help="report path; the plot goes beside it (.png)")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specray.training.evaluate import EvalConfig, evaluate, plot_acceptance

    report = evaluate(
        EvalConfig(
            drafters=tuple(args.drafter),
            labels=tuple(args.label),
            target=args.target,
            dataset=args.dataset,
            num_prompts=args.num_prompts,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            num_speculative_tokens=args.num_speculative_tokens,
            seed=args.seed,
            dtype=args.dtype,
        )
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    plot_acceptance(report, args.json.with_suffix(".png"))
    for r in report["results"]:
        match = r["matches_autoregressive"]
        print(
            f"{r['drafter']:<32} τ {r['tau']:.3f}  lossless {match}  accept {[round(a, 2) for a in r['accept_by_position']]}"
        )
    return 0
