"""`specray train data|cache|fit|calibrate|score|recipe`: the DeepSpec-style drafter training pipeline.

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
    data.add_argument("--batch-size", type=int, default=48, help="sequences decoded at once")
    data.add_argument(
        "--batch-tokens", type=int, default=4096, help="tokens per engine step (prefill chunks)"
    )
    data.add_argument(
        "--shard-size", type=int, default=256, help="prompts per output shard (a restart redoes at most one)"
    )
    data.add_argument(
        "--prompt-turns",
        choices=("first", "all"),
        default="first",
        help="a conversation's first human turn, or every human turn as its own prompt (~3x as many)",
    )
    data.add_argument("--seed", type=int, default=0)
    data.add_argument(
        "--sharegpt", type=Path, help="a ShareGPT-format JSON/JSONL(.gz) instead of the package"
    )
    data.add_argument("--device", default="cpu")
    data.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    data.add_argument(
        "--worker",
        type=_worker_share,
        default=(0, 1),
        help="W/N: this process writes the shards numbered W mod N (N processes share one run)",
    )
    data.add_argument("--time-budget-minutes", type=float, help="start no new shard after this long")
    data.add_argument(
        "--plan-only", action="store_true", help="tokenize and plan the prompts for the workers, then stop"
    )
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
    fit.add_argument(
        "--cache",
        type=Path,
        default=WORK / "cache",
        help="a target cache, or a `train data` directory to compute the target's features online",
    )
    fit.add_argument(
        "--num-features",
        type=int,
        default=5,
        help="m target layers for online features (a cache fixes its own)",
    )
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
    fit.add_argument(
        "--feature-dtype",
        default="float32",
        choices=DTYPE_CHOICES,
        help="dtype of the target computing features online (a cache fixes its own)",
    )
    fit.add_argument(
        "--markov-candidates",
        type=int,
        default=0,
        help="dspark: when drafting, sample each slot among its M most likely backbone columns only "
        "(the Markov head's cost becomes an [M, r] gather; 0: all columns)",
    )
    fit.add_argument("--epochs", type=int, default=2)
    fit.add_argument("--lr", type=float, default=6e-4)
    fit.add_argument("--sequences-per-step", type=int, default=4)
    fit.add_argument("--anchors-per-sequence", type=int, default=16)
    fit.add_argument("--device", default="cpu")
    fit.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA, off on CPU)",
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--time-budget-minutes", type=float, help="shorten the schedule to end within this")
    fit.add_argument(
        "--max-steps", type=int, help="end the schedule after this many steps (before its epochs)"
    )
    fit.add_argument("--save-every", type=int, default=20, help="checkpoint the training state every N steps")
    fit.add_argument("--save-every-minutes", type=float, default=10.0, help="... and every this many minutes")
    fit.set_defaults(func=run_fit)

    cal = steps.add_parser(
        "calibrate",
        formatter_class=HelpFormatter,
        help="sequential Platt scaling of the confidence head, and the n-gram prior of a hybrid",
    )
    cal.add_argument("--drafter", type=Path, required=True)
    cal.add_argument(
        "--cache", type=Path, default=WORK / "cache", help="a target cache or a `train data` directory"
    )
    cal.add_argument("--anchors-per-sequence", type=int, default=64)
    cal.add_argument(
        "--folds",
        type=int,
        default=2,
        help="sequence folds for the out-of-sample ECE (each scored by a fit on the rest)",
    )
    cal.add_argument("--device", default="cpu")
    cal.set_defaults(func=run_calibrate)

    score = steps.add_parser(
        "score",
        formatter_class=HelpFormatter,
        help="estimate drafters' τ on the held-out cache, teacher-forced (seconds, no engine)",
    )
    score.add_argument("--drafter", action="append", required=True, help="a checkpoint dir; repeatable")
    score.add_argument("--target", default=DEFAULT_MODEL)
    score.add_argument(
        "--cache", type=Path, default=WORK / "cache", help="a target cache or a `train data` directory"
    )
    score.add_argument("--device", default="cpu")
    score.add_argument("--json", type=Path, help="write both reports here (+ a PNG per temperature)")
    score.set_defaults(func=run_score)

    _register_recipe(steps)


def _register_recipe(steps: argparse._SubParsersAction) -> None:
    recipe = steps.add_parser(
        "recipe",
        formatter_class=HelpFormatter,
        help="data → fit of every kind (features online) → calibrate → score, in one timed run (a GPU slot)",
    )
    recipe.add_argument("--out", type=Path, default=WORK / "recipe", help="working directory (resumable)")
    recipe.add_argument("--export", type=Path, required=True, help="the checkpoints and recipe.json, flat")
    recipe.add_argument("--target", default=DEFAULT_MODEL)
    recipe.add_argument("--sharegpt", type=Path, help="a ShareGPT-format file instead of the package")
    recipe.add_argument("--prompt-turns", choices=("first", "all"), default="all")
    recipe.add_argument("--num-train", type=int, default=60_000)
    recipe.add_argument("--num-valid", type=int, default=256)
    recipe.add_argument("--max-prompt-tokens", type=int, default=256)
    recipe.add_argument("--max-new-tokens", type=int, default=256)
    recipe.add_argument("--data-workers", type=int, default=12, help="regeneration processes")
    recipe.add_argument("--batch-size", type=int, default=512, help="sequences per regeneration process")
    recipe.add_argument("--shard-size", type=int, default=1024)
    recipe.add_argument("--data-minutes", type=float, default=4.0, help="no new shard after this")
    recipe.add_argument("--fit-minutes", type=float, default=2.5, help="each kind's training budget")
    recipe.add_argument("--kinds", nargs="+", choices=KIND_NAMES, default=list(KIND_NAMES))
    recipe.add_argument("--num-layers", type=int, default=1)
    recipe.add_argument("--epochs", type=int, default=1)
    recipe.add_argument("--sequences-per-step", type=int, default=16)
    recipe.add_argument("--anchors-per-sequence", type=int, default=64)
    recipe.add_argument("--lr", type=float, default=1e-3)
    recipe.add_argument("--device", default="cpu")
    recipe.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="regeneration dtype")
    recipe.set_defaults(func=run_recipe)


def run_recipe(args: argparse.Namespace) -> int:
    from specray.training.recipe import RecipeConfig, run_recipe

    report = run_recipe(
        RecipeConfig(
            out_dir=args.out,
            export_dir=args.export,
            target=args.target,
            sharegpt=args.sharegpt,
            prompt_turns=args.prompt_turns,
            num_train=args.num_train,
            num_valid=args.num_valid,
            max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_new_tokens,
            data_workers=args.data_workers,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            data_minutes=args.data_minutes,
            fit_minutes=args.fit_minutes,
            kinds=tuple(args.kinds),
            num_layers=args.num_layers,
            epochs=args.epochs,
            sequences_per_step=args.sequences_per_step,
            anchors_per_sequence=args.anchors_per_sequence,
            lr=args.lr,
            device=args.device,
            dtype=args.dtype,
        )
    )
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))
    return 0


def _worker_share(text: str) -> tuple[int, int]:
    worker, _, count = text.partition("/")
    if not (worker.isdigit() and count.isdigit() and int(worker) < int(count)):
        raise argparse.ArgumentTypeError(f"expected W/N with 0 <= W < N, got {text!r}")
    return int(worker), int(count)


def run_data(args: argparse.Namespace) -> int:
    from specray.training.regenerate import DataConfig, regenerate

    worker, num_workers = args.worker
    counts = regenerate(
        DataConfig(
            target=args.target,
            out_dir=args.out,
            num_train=args.num_train,
            num_valid=args.num_valid,
            max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            batch_tokens=args.batch_tokens,
            shard_size=args.shard_size,
            prompt_turns=args.prompt_turns,
            seed=args.seed,
            sharegpt=args.sharegpt,
            device=args.device,
            dtype=args.dtype,
            worker=worker,
            num_workers=num_workers,
            time_budget_s=None if args.time_budget_minutes is None else 60 * args.time_budget_minutes,
            plan_only=args.plan_only,
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
            num_features=args.num_features,
            out_dir=args.out,
            num_layers=args.num_layers,
            draft_block_size=args.draft_block_size,
            markov_rank=args.markov_rank,
            state_input=args.state_input,
            markov_tied=args.markov_tied,
            draft_vocab_size=args.draft_vocab_size,
            markov_candidates=args.markov_candidates,
            feature_dtype=args.feature_dtype,
            epochs=args.epochs,
            lr=args.lr,
            sequences_per_step=args.sequences_per_step,
            anchors_per_sequence=args.anchors_per_sequence,
            device=args.device,
            autocast=args.autocast,
            seed=args.seed,
            time_budget_s=None if args.time_budget_minutes is None else 60 * args.time_budget_minutes,
            max_steps=args.max_steps,
            save_every=args.save_every,
            save_every_minutes=args.save_every_minutes,
        )
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0


def run_score(args: argparse.Namespace) -> int:
    from specray.training.acceptance_estimate import score_drafters
    from specray.training.evaluate import plot_acceptance
    from specray.workers.models.loader import load_model

    reports = score_drafters(
        args.drafter, load_model(args.target, "float32", args.device), args.target, args.cache
    )
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
            drafter=args.drafter,
            cache_dir=args.cache,
            anchors_per_sequence=args.anchors_per_sequence,
            folds=args.folds,
            device=args.device,
        )
    )
    for key in ("position", "ece_before", "ece_after", "ece_out_of_sample", "auc_before", "auc_after"):
        values = report[key] or ["too few sequences to split"]
        print(key.ljust(17), " ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values))
    return 0
