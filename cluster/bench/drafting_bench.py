"""`specray bench drafting`: what one proposal costs against one target decode step, in one run.

For each dtype and batch size, the first `batch` HumanEval prompts are prefilled once; then, in
interleaved repetitions, one autoregressive decode step of the target over the batch (its KV rolled
back after each) and one γ-token proposal of every drafter over the same sequences (each preceded by
re-delivering the last two positions' features, as after a verify step that accepted one draft, so
the drafter re-projects them as it does while serving). Medians of the repetitions are reported:
the proposal's time as a fraction of the step is the drafting cost a speculative step pays.

`--clock cpu` times the process's CPU time instead of the wall clock: on a machine shared with other
work (preempted or paused processes), one thread's CPU time still measures the work itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from specray.training.prompt_sets import humaneval_prompts
from specray.workers.drafters.registry import build_drafter, drafter_feature_layers
from specray.workers.engine.drafter import Drafter, DraftRequest
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.dtype import resolve_dtype
from specray.workers.models.loader import load_model

# Positions whose features each repetition delivers again (the accepted draft and the bonus token).
REDELIVERED = 2


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = list(dict.fromkeys(str(resolve_dtype(d)).removeprefix("torch.") for d in args.dtype or ["auto"]))
    rows = []
    for dtype in dtypes:
        target = load_model(args.model, dtype)
        engine = LLMEngine(target)
        prompts = [engine.encode_prompt(messages=m) for m in humaneval_prompts(max(args.batch))]
        drafters = {_label(name): build_drafter(name, target) for name in args.drafter}
        layers = tuple(sorted({layer for name in args.drafter for layer in drafter_feature_layers(name)}))
        runner = ModelRunner(target.model, 16384, 16, layers)
        prefill = runner.run([ScheduledSequence(f"p{i}", ids, 1) for i, ids in enumerate(prompts)])
        anchors = [int(logits[-1].argmax()) for logits in prefill.logits]
        for batch in args.batch:
            for temperature in args.temperature:
                measured = _measure(
                    target, drafters, layers, prompts[:batch], anchors, prefill.features, temperature, args
                )
                rows += [{"dtype": dtype, **row} for row in measured]
    report = {
        "model": args.model,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "clock": args.clock,
        "num_speculative_tokens": args.num_speculative_tokens,
        "repetitions": args.repetitions,
        "results": rows,
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    _print_table(rows)
    _plot(rows, Path(args.json).with_suffix(".png"))
    return 0


def _measure(
    target,  # noqa: ANN001 - a LoadedModel
    drafters: dict[str, Drafter],
    layers: tuple[int, ...],
    prompts: list[list[int]],
    anchors: list[int],
    features: list[torch.Tensor] | None,
    temperature: float,
    args: argparse.Namespace,
) -> list[dict]:
    """Median times of a decode step and of each drafter's proposal over one batch of prompts."""
    step_runner = ModelRunner(target.model, 16384, 16, ())
    step_runner.run([ScheduledSequence(f"s{i}", ids, 1) for i, ids in enumerate(prompts)])
    decode = [ScheduledSequence(f"s{i}", [anchors[i]], 1) for i in range(len(prompts))]
    params = SamplingParams(max_tokens=1 << 20, temperature=temperature)
    hidden_size = target.config.hidden_size

    def deliver(drafter: Drafter, last: int | None) -> None:
        """Features of the drafter's own layers (a subset of the union the prefill captured): all
        of each prompt's, or its last `last` positions again."""
        if not drafter.feature_layers:
            return
        own = [layers.index(layer) for layer in drafter.feature_layers]
        for i, f in enumerate(features[: len(prompts)]):
            start = 0 if last is None else f.shape[0] - last
            drafter.observe(f"s{i}", _select(f[start:], own, hidden_size), start)

    for drafter in drafters.values():
        for i in range(len(prompts)):
            drafter.release(f"s{i}")
        deliver(drafter, None)

    def requests() -> list[DraftRequest]:
        return [
            DraftRequest(f"s{i}", ids + [anchors[i]], args.num_speculative_tokens, params, torch.Generator())
            for i, ids in enumerate(prompts)
        ]

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    step_times: list[float] = []
    propose_times: dict[str, list[float]] = {name: [] for name in drafters}
    label = f"batch {len(prompts)}, T={temperature:g}"
    for rep in tqdm(range(args.repetitions + 1), desc=label):
        start = clock()
        step_runner.run(decode)
        elapsed = clock() - start
        for i, ids in enumerate(prompts):
            step_runner.rollback(f"s{i}", len(ids))
        if rep:  # the first repetition warms up
            step_times.append(elapsed)
        for name, drafter in drafters.items():
            deliver(drafter, REDELIVERED)
            start = clock()
            drafter.propose(requests())
            if rep:
                propose_times[name].append(clock() - start)
    step_ms = 1e3 * statistics.median(step_times)
    return [
        {
            "drafter": name,
            "batch": len(prompts),
            "temperature": temperature,
            "step_ms": step_ms,
            "propose_ms": 1e3 * statistics.median(times),
            "propose_per_step": statistics.median(times) / statistics.median(step_times),
        }
        for name, times in propose_times.items()
    ]


def _select(features: torch.Tensor, own: list[int], hidden_size: int) -> torch.Tensor:
    """The columns of the drafter's own feature layers from features captured for a union of layers."""
    blocks = features.view(features.shape[0], -1, hidden_size)
    return blocks[:, own].reshape(features.shape[0], -1)


def _label(name: str) -> str:
    return Path(name).name if "/" in name else name


def _print_table(rows: list[dict]) -> None:
    print(f"{'drafter':<28}{'dtype':>10}{'batch':>7}{'T':>5}{'step ms':>10}{'propose ms':>12}{'÷ step':>8}")
    for r in rows:
        print(
            f"{r['drafter']:<28}{r['dtype']:>10}{r['batch']:>7}{r['temperature']:>5g}{r['step_ms']:>10.2f}"
            f"{r['propose_ms']:>12.2f}{r['propose_per_step']:>8.3f}"
        )


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["dtype"], r["batch"], r["temperature"]) for r in rows))
    names = list(dict.fromkeys(r["drafter"] for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    for i, name in enumerate(names):
        by_case = {
            (r["dtype"], r["batch"], r["temperature"]): r["propose_per_step"]
            for r in rows
            if r["drafter"] == name
        }
        xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(cases))]
        ax.bar(xs, [by_case.get(case, 0.0) for case in cases], width, label=name, color=f"C{i}")
    ax.axhline(0.15, color="grey", linestyle="--", linewidth=1, label="15% of a step")
    ax.set_xticks(range(len(cases)), [f"{d}\nbatch {b}, T={t:g}" for d, b, t in cases], fontsize=8)
    ax.set_ylabel("proposal time ÷ target decode step")
    ax.set_title("specray bench drafting (γ-token proposal vs one decode step)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
