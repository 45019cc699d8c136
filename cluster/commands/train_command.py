"""`specray train data|cache|fit|calibrate|score`: the DeepSpec-style drafter training pipeline.

Each step reads the previous one's output directory, is resumable, and shows progress bars.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specray.cluster.commands.cli import HelpFormatter
from specray.defaults import DEFAULT_MODEL
from specray.workers.models.dtype import DTYPE_CHOICES

# The drafter kinds `fit` trains (workers/drafters/kinds.py, whose import loads torch; a test checks).
KIND_NAMES = ("dspark", "dflash", "eagle3")

WORK = Path(".scratch/train")


def register(p: argparse.ArgumentParser) -> None:
    steps = p.add_subparsers(dest="step", required=True)

    data = steps.add_parser(
        "data", formatter_class=HelpFormatter, help="regenerate responses to ShareGPT prompts with the target"
    )
    data.add_argument("--target", default=DEFAULT_MODEL)
    data.add_argument("--out", type=Path, default=WORK / "data")
    data.add_argument("--num-train", type=int, default=112)
    data.add_argument("--num-valid", type=int, default=24)
    data.add_argument("--max-prompt-tokens", type=int, default=192)
    data.add_argument("--max-new-tokens", type=int, default=64)
    data.add_argument("--batch-size", type=int, default=48)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument(
        "--sharegpt", type=Path, help="a ShareGPT-format JSON/JSONL(.gz) instead of the package"
    )
    data.add_argument("--device", default="cpu")
    data.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    data.set_defaults(func=run_data)

    cache = steps.add_parser(
        "cache", formatter_class=HelpFormatter, help="cache the target's features and final hidden states"
    )
    cache.add_argument("--target", default=DEFAULT_MODEL)
    cache.add_argument("--data", type=Path, default=WORK / "data")
    cache.add_argument("--out", type=Path, default=WORK / "cache")
    cache.add_argument("--num-features", type=int, default=5, help="m target layers, spread by DSpark's rule")
    cache.add_argument("--shard-records", type=int, default=32)
    cache.add_argument("--batch-tokens", type=int, default=2048)
    cache.add_argument("--device", default="cpu")
    cache.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    cache.set_defaults(func=run_cache)

    fit = steps.add_parser(
        "fit", formatter_class=HelpFormatter, help="train a dspark, dflash or eagle3 drafter from the cache"
    )
    fit.add_argument("--kind", choices=KIND_NAMES, default="dspark")
    fit.add_argument("--target", default=DEFAULT_MODEL)
    fit.add_argument("--cache", type=Path, default=WORK / "cache")
    fit.add_argument("--out", type=Path, required=True)
    fit.add_argument("--num-layers", type=int, default=1)
    fit.add_argument(
        "--draft-block-size",
        type=int,
        default=7,
        help="slots per drafted block (γ at most this, checked at start-up)",
    )
    fit.add_argument("--markov-rank", type=int, default=32)
    fit.add_argument(
        "--state-input",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="dspark/dflash: block slot inputs carry the target's last context state (H_ctx at anchor−1)",
    )
    fit.add_argument(
        "--markov-tied",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="dspark: the Markov head's W1/W2 factor through the target's embedding and LM head",
    )
    fit.add_argument(
        "--draft-vocab-size",
        type=int,
        default=0,
        help="propose only the K most frequent target tokens of the training data (0: the whole vocabulary)",
    )
    fit.add_argument("--epochs", type=int, default=2)
    fit.add_argument("--lr", type=float, default=6e-4)
    fit.add_argument("--sequences-per-step", type=int, default=4)
    fit.add_argument("--anchors-per-sequence", type=int, default=16)
    fit.add_argument("--device", default="cpu")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--time-budget-minutes", type=float, help="shorten the schedule to end within this")
    fit.set_defaults(func=run_fit)

    cal = steps.add_parser(
        "calibrate",
        formatter_class=HelpFormatter,
        help="sequential temperature scaling of the confidence head",
    )
    cal.add_argument("--drafter", type=Path, required=True)
    cal.add_argument("--cache", type=Path, default=WORK / "cache")
    cal.add_argument("--anchors-per-sequence", type=int, default=64)
    cal.set_defaults(func=run_calibrate)

    score = steps.add_parser(
        "score",
        formatter_class=HelpFormatter,
        help="estimate drafters' τ on the held-out cache, teacher-forced (seconds, no engine)",
    )
    score.add_argument("--drafter", action="append", required=True, help="a checkpoint dir; repeatable")
    score.add_argument("--target", default=DEFAULT_MODEL)
    score.add_argument("--cache", type=Path, default=WORK / "cache")
    score.add_argument("--json", type=Path, help="write both reports here (+ a PNG per temperature)")
    score.set_defaults(func=run_score)


def run_data(args: argparse.Namespace) -> int:
    from specray.training.regenerate import DataConfig, regenerate

    counts = regenerate(
        DataConfig(
            target=args.target,
            out_dir=args.out,
            num_train=args.num_train,
            num_valid=args.num_valid,
            max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            sharegpt=args.sharegpt,
            device=args.device,
            dtype=args.dtype,
        )
    )
    print(json.dumps(counts))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from specray.training.target_cache import CacheConfig, build_cache

    manifest = build_cache(
        CacheConfig(
            target=args.target,
            data_dir=args.data,
            out_dir=args.out,
            num_features=args.num_features,
            shard_records=args.shard_records,
            batch_tokens=args.batch_tokens,
            device=args.device,
            dtype=args.dtype,
        )
    )
    print(json.dumps({"feature_layers": manifest["feature_layers"], "splits": manifest["splits"]}))
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from specray.training.fit import FitConfig, fit

    summary = fit(
        FitConfig(
            kind=args.kind,
            target=args.target,
            cache_dir=args.cache,
            out_dir=args.out,
            num_layers=args.num_layers,
            draft_block_size=args.draft_block_size,
            markov_rank=args.markov_rank,
            state_input=args.state_input,
            markov_tied=args.markov_tied,
            draft_vocab_size=args.draft_vocab_size,
            epochs=args.epochs,
            lr=args.lr,
            sequences_per_step=args.sequences_per_step,
            anchors_per_sequence=args.anchors_per_sequence,
            device=args.device,
            seed=args.seed,
            time_budget_s=None if args.time_budget_minutes is None else 60 * args.time_budget_minutes,
        )
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0


def run_score(args: argparse.Namespace) -> int:
    from specray.training.acceptance_estimate import score_drafters
    from specray.training.evaluate import plot_acceptance
    from specray.workers.models.loader import load_model

    reports = score_drafters(args.drafter, load_model(args.target), args.target, args.cache)
    for report in reports:
        print(f"T={report['temperature']:g}")
        for r in report["results"]:
            print(
                f"  {r['drafter']:<28} τ={r['tau']:.3f}  "
                + " ".join(f"{a:.3f}" for a in r["accept_by_position"])
                + f"  vocabulary covers {r['vocab_coverage']:.1%} of the responses"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
        for report in reports:
            plot_acceptance(report, args.json.with_name(f"{args.json.stem}-t{report['temperature']:g}.png"))
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from specray.training.calibrate import CalibrateConfig, calibrate

    report = calibrate(
        CalibrateConfig(
            drafter=args.drafter, cache_dir=args.cache, anchors_per_sequence=args.anchors_per_sequence
        )
    )
    for key in ("position", "ece_before", "ece_after", "auc_before", "auc_after"):
        print(key.ljust(11), " ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in report[key]))
    return 0
