"""`specray bench serve`: the cluster under load, autoregressive vs fixed-γ vs confidence-scheduled,
beside the in-process engine doing the same work.

One invocation starts a local cluster (Ray on 127.0.0.1, Redis, router, one draft worker, one
verifier) per mode, with the same configuration except `scheduling` (`off`, `fixed`, `confidence`),
and replays the same ShareGPT held-out prompts (fixed seed, greedy) over the router's gRPC streaming
API at each concurrency (a closed loop: each of c clients sends its next prompt when its last one
finishes). At each concurrency the in-process engine runs the same prompts first, configured as
the verifier (model, dtype, drafter, γ, scheduling, step curve, torch threads) with a batch of c
(`engine_reference.py`): cluster ÷ engine is what the cluster costs. Per mode and concurrency:
output tokens/s, TTFT, inter-token latency (a step that commits k tokens after a gap g counts k
latencies of g/k), τ and the verify budget per request-step, and whether the output equals the
cluster's autoregressive output at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import redis
from tqdm import tqdm

from specray.cluster.bench.request_timing import RequestTiming
from specray.cluster.bench.step_counters import StepCounters
from specray.defaults import DEFAULT_MODEL
from specray.workers.models.dtype import DTYPE_CHOICES

if TYPE_CHECKING:
    from specray.cluster.runtime.config import ClusterConfig
    from specray.workers.engine.step_curve import StepCurve
    from specray.workers.models.loader import LoadedModel

# Bench mode → the cluster's `scheduling`.
MODES = {"autoregressive": "off", "fixed": "fixed", "confidence": "confidence"}
CLUSTER, ENGINE = "cluster", "engine"


@dataclass
class Run:
    mode: str
    concurrency: int
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    per_user_tokens_per_s: float  # each request's output tokens / its latency, averaged
    tau: float | None  # tokens committed per request-step (accepted drafts + 1); None without drafts
    verify_tokens_per_step: float  # anchor + verified drafts per request-step: the verify budget
    batch_size: float  # request-steps (prefills included) per target forward: how well steps batch
    proposed_tokens_per_step: float | None  # drafts the draft worker sent per request-step (cluster)
    matches_autoregressive: bool  # the cluster's autoregressive output at this concurrency
    num_requests: int
    output_tokens: int
    load_avg_1m: float  # the machine's 1-minute load average at the end (others' work shows here)
    runs_on: str = CLUSTER  # CLUSTER, or ENGINE: the in-process reference
    # Cluster rows: its output tokens/s and TTFT p50 ÷ the engine reference's at this concurrency.
    cluster_over_engine: float | None = None
    ttft_over_engine: float | None = None


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--drafter", default=None, help="ngram or a trained drafter (default: the one `specray serve` uses)"
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="the target's dtype, everywhere")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=5, help="γ")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--seed", type=int, default=0, help="ShareGPT held-out split seed")
    p.add_argument("--max-prompt-chars", type=int, default=600, help="skip longer ShareGPT prompts")
    p.add_argument(
        "--verifier-threads", type=int, default=1, help="torch threads of the verifier and of the engine"
    )
    p.add_argument("--ray-temp-dir", default=None, help="Ray's session directory (default: Ray's own)")
    p.add_argument("--json", required=True, help="where to write the results (a PNG goes beside it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from specray.cluster.app.launcher import LocalCluster
    from specray.cluster.runtime.config import ClusterConfig
    from specray.training.sharegpt import sharegpt_prompts
    from specray.workers.engine.scheduling_policy import policy_class
    from specray.workers.verifier.deployment import load_step_curve, load_target

    levels = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"unknown modes {sorted(unknown)}: choose from {', '.join(MODES)}")
    if min(levels) < 1 or args.num_prompts < max(levels):
        raise ValueError("concurrency levels must be >= 1 and at most --num-prompts")
    # Autoregressive first: every other mode's output is checked against it.
    modes = sorted(modes, key=list(MODES).index)
    prompts = [
        p.text
        for p in sharegpt_prompts("heldout", args.num_prompts, args.seed, max_chars=args.max_prompt_chars)
    ]
    if len(prompts) < args.num_prompts:
        raise ValueError(f"only {len(prompts)} held-out ShareGPT prompts fit --max-prompt-chars")
    base = ClusterConfig(
        model=args.model,
        num_speculative_tokens=args.num_speculative_tokens,
        dtype=args.dtype,
        http_port=0,
        grpc_port=0,
        ray_temp_dir=args.ray_temp_dir,
        verifiers={"torch_threads": args.verifier_threads},
    ).with_overrides(drafter=args.drafter)

    # The engine reference runs here, with the verifier's threads, on the prompts the router builds.
    torch.set_num_threads(args.verifier_threads)
    target = load_target(base)
    dtype = str(next(target.model.parameters()).dtype).removeprefix("torch.")
    prompt_ids = [
        list(
            target.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for p in prompts
    ]

    runs: list[Run] = []
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    progress = tqdm(total=len(modes) * len(levels), desc="bench serve")
    for mode in modes:
        config = base.with_overrides(scheduling=MODES[mode])
        curve = load_step_curve(target, config) if policy_class(config.scheduling).needs_step_curve else None
        with LocalCluster(config) as cluster:
            # One short request first: loads, compiles and warms every replica on the path.
            asyncio.run(_load(cluster.grpc_address, prompts[:1], 1, 4))
            for c in levels:
                progress.set_postfix(mode=mode, concurrency=c)
                engine_run, engine_outputs = _engine_run(
                    target, config, curve, mode, c, prompt_ids, args.max_tokens
                )
                before = _verifier_counters(cluster.config.redis_url)
                start = time.perf_counter()
                replies = asyncio.run(_load(cluster.grpc_address, prompts, c, args.max_tokens))
                elapsed = time.perf_counter() - start
                after = _verifier_counters(cluster.config.redis_url)
                outputs[mode, c] = [r.token_ids for r in replies]
                reference = outputs["autoregressive", c] if "autoregressive" in modes else None
                cluster_run = _summarize(mode, c, replies, elapsed, after.since(before), reference)
                engine_run.matches_autoregressive = reference is None or engine_outputs == reference
                cluster_run.cluster_over_engine = (
                    cluster_run.output_tokens_per_s / engine_run.output_tokens_per_s
                )
                cluster_run.ttft_over_engine = cluster_run.ttft_p50_s / max(engine_run.ttft_p50_s, 1e-9)
                runs += [engine_run, cluster_run]
                progress.update()
    progress.close()

    report = {
        "model": args.model,
        "drafter": base.drafter,
        "dtype": dtype,
        "num_speculative_tokens": args.num_speculative_tokens,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "verifier_threads": args.verifier_threads,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "cluster_over_engine": {
            mode: {
                str(r.concurrency): r.cluster_over_engine
                for r in runs
                if r.mode == mode and r.runs_on == CLUSTER
            }
            for mode in modes
        },
        "runs": [asdict(r) for r in runs],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    _print_table(runs)
    _plot(
        runs,
        f"{args.model} ({dtype}) + {base.drafter}, γ={args.num_speculative_tokens}",
        Path(args.json).with_suffix(".png"),
    )
    return 0


def _engine_run(
    target: LoadedModel,
    config: ClusterConfig,
    curve: StepCurve | None,
    mode: str,
    concurrency: int,
    prompt_ids: list[list[int]],
    max_tokens: int,
) -> tuple[Run, list[list[int]]]:
    """The engine reference at one concurrency, and its outputs in prompt order."""
    from specray.cluster.bench.engine_reference import closed_loop, reference_engine

    engine = reference_engine(target, config, concurrency, curve)
    closed_loop(engine, prompt_ids[:1], 4)  # warm-up
    start = time.perf_counter()
    timings, counters = closed_loop(engine, prompt_ids, max_tokens)
    elapsed = time.perf_counter() - start
    run = _summarize(mode, concurrency, timings, elapsed, counters, None, ENGINE)
    return run, [t.token_ids for t in timings]


# ---- load ----------------------------------------------------------------------------------------
async def _load(address: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[RequestTiming]:
    """Every prompt once, `concurrency` streams at a time; timings in prompt order."""
    from specray.protos.specray.v1 import generate_pb2, generate_pb2_grpc

    timings = [RequestTiming() for _ in prompts]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)

        async def client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                request = generate_pb2.GenerateRequest(
                    messages=[generate_pb2.ChatMessage(role="user", content=prompts[i])],
                    max_tokens=max_tokens,
                    temperature=0.0,
                )
                start = time.perf_counter()
                async for message in stub.GenerateStream(request):
                    timings[i].arrived(list(message.token_ids), time.perf_counter() - start)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings


def _verifier_counters(redis_url: str) -> StepCounters:
    """Every live verifier's draft counters (Stats RPC), summed."""
    from specray.protos.specray.v1 import verify_pb2, verify_pb2_grpc

    totals = StepCounters(0, 0, 0, 0, 0)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for key in client.scan_iter(match="specray:verifier:*"):
            with grpc.insecure_channel(client.hget(key, "address")) as channel:
                stats = verify_pb2_grpc.VerifierStub(channel).Stats(verify_pb2.StatsRequest())
            totals.steps += stats.segments
            totals.proposed_drafts += stats.proposed_drafts
            totals.verified_drafts += stats.verified_drafts
            totals.accepted_drafts += stats.accepted_drafts
            totals.forwards += stats.steps
    finally:
        client.close()
    return totals


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summarize(
    mode: str,
    concurrency: int,
    replies: list[RequestTiming],
    elapsed: float,
    counters: StepCounters,
    reference: list[list[int]] | None,
    runs_on: str = CLUSTER,
) -> Run:
    """One load run; `counters`: what its request-steps did (end minus start for the cluster)."""
    steps = max(counters.steps, 1)
    tokens = sum(len(r.token_ids) for r in replies)
    itls = [x for r in replies for x in r.itls]
    return Run(
        mode=mode,
        concurrency=concurrency,
        output_tokens_per_s=tokens / elapsed,
        ttft_p50_s=_percentile([r.ttft for r in replies], 0.5),
        ttft_p99_s=_percentile([r.ttft for r in replies], 0.99),
        itl_p50_s=_percentile(itls, 0.5),
        itl_p99_s=_percentile(itls, 0.99),
        per_user_tokens_per_s=statistics.mean(len(r.token_ids) / r.latency for r in replies),
        tau=(steps + counters.accepted_drafts) / steps if mode != "autoregressive" else None,
        verify_tokens_per_step=(steps + counters.verified_drafts) / steps,
        # Every request adds one prefill request-step to its decode steps.
        batch_size=(counters.steps + len(replies)) / max(counters.forwards, 1),
        proposed_tokens_per_step=(
            counters.proposed_drafts / steps if counters.proposed_drafts is not None else None
        ),
        matches_autoregressive=reference is None or reference == [r.token_ids for r in replies],
        num_requests=len(replies),
        output_tokens=tokens,
        load_avg_1m=os.getloadavg()[0],
        runs_on=runs_on,
    )


# ---- report --------------------------------------------------------------------------------------
def _print_table(runs: list[Run]) -> None:
    """Every run, then cluster ÷ engine (output tokens/s) per mode and concurrency."""
    print(
        f"{'mode':<15}{'runs on':>8}{'conc':>5}{'tok/s':>9}{'user tok/s':>11}{'TTFT p50':>10}"
        f"{'ITL p50':>9}{'ITL p99':>9}{'tau':>6}{'verify/step':>12}{'sent/step':>10}{'batch':>7}"
        f"{'cl/eng':>8}{'TTFT cl/eng':>12}  matches AR"
    )
    for r in runs:
        print(
            f"{r.mode:<15}{r.runs_on:>8}{r.concurrency:>5}{r.output_tokens_per_s:>9.1f}"
            f"{r.per_user_tokens_per_s:>11.2f}{r.ttft_p50_s:>10.3f}{r.itl_p50_s:>9.3f}{r.itl_p99_s:>9.3f}"
            f"{_optional(r.tau):>6}{r.verify_tokens_per_step:>12.2f}"
            f"{_optional(r.proposed_tokens_per_step):>10}{r.batch_size:>7.1f}"
            f"{_optional(r.cluster_over_engine):>8}{_optional(r.ttft_over_engine):>12}"
            f"  {r.matches_autoregressive}"
        )
    cluster = [r for r in runs if r.runs_on == CLUSTER]
    levels = sorted({r.concurrency for r in cluster})
    print("\ncluster_over_engine (output tokens/s)")
    print(f"{'mode':<15}" + "".join(f"{'c=' + str(c):>8}" for c in levels))
    for mode in MODES:
        ratios = {r.concurrency: r.cluster_over_engine for r in cluster if r.mode == mode}
        if ratios:
            print(f"{mode:<15}" + "".join(f"{_optional(ratios.get(c)):>8}" for c in levels))


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _plot(runs: list[Run], title: str, path: Path) -> None:
    """Cluster (solid) and engine (dashed) per mode; the last panel is cluster ÷ engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("output_tokens_per_s", "output tokens/s"),
        ("ttft_p50_s", "TTFT p50 (s)"),
        ("itl_p50_s", "inter-token latency p50 (s)"),
        ("verify_tokens_per_step", "verify tokens per request-step"),
        ("batch_size", "requests per target forward"),
        ("cluster_over_engine", "cluster ÷ engine (output tokens/s)"),
    ]
    fig, grid = plt.subplots(2, 3, figsize=(13, 7.6))
    axes = grid.flatten()
    for ax, (field, label) in zip(axes, panels):
        for color, mode in enumerate(MODES):
            for runs_on, style in ((CLUSTER, "-"), (ENGINE, "--")):
                points = [
                    (r.concurrency, getattr(r, field))
                    for r in runs
                    if r.mode == mode and r.runs_on == runs_on and getattr(r, field) is not None
                ]
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=f"C{color}", label=f"{mode} ({runs_on})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[-1].axhline(1.0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"specray bench serve: {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
