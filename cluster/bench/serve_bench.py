"""`specray bench serve`: the cluster under load, autoregressive vs fixed-γ vs confidence-scheduled.

One invocation starts a local cluster (Ray on 127.0.0.1, Redis, router, one draft worker, one
verifier) per mode, with the same configuration except `scheduling` (`off`, `fixed`, `confidence`),
and replays the same ShareGPT held-out prompts (fixed seed, greedy) over the router's gRPC streaming
API at each concurrency (a closed loop: each of c clients sends its next prompt when its last one
finishes). Per mode and concurrency: output tokens/s, TTFT, inter-token latency (a verify step that
commits k tokens after a gap g counts k latencies of g/k), τ and the verify budget per request-step
from the verifiers' counters, and whether the output equals autoregressive at the same concurrency.
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

import grpc
import redis
from tqdm import tqdm

from specray.defaults import DEFAULT_MODEL

# Bench mode → the cluster's `scheduling`.
MODES = {"autoregressive": "off", "fixed": "fixed", "confidence": "confidence"}
DEFAULT_DRAFTER = "smollm2-135m-dspark"  # the bundled DSpark drafter of the default model


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
    proposed_tokens_per_step: float  # drafts the draft worker sent per request-step
    matches_autoregressive: bool
    num_requests: int
    output_tokens: int
    load_avg_1m: float  # the machine's 1-minute load average at the end (others' work shows here)


@dataclass
class _Reply:
    token_ids: list[int]
    ttft: float
    latency: float
    itls: list[float]


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--drafter",
        default=None,
        help=f"ngram or a trained drafter (default: {DEFAULT_DRAFTER} for the default model, else ngram)",
    )
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency levels")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=5, help="γ")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--seed", type=int, default=0, help="ShareGPT held-out split seed")
    p.add_argument("--max-prompt-chars", type=int, default=600, help="skip longer ShareGPT prompts")
    p.add_argument("--verifier-threads", type=int, default=1, help="torch threads of the verifier")
    p.add_argument("--ray-temp-dir", default=None, help="Ray's session directory (default: Ray's own)")
    p.add_argument("--json", required=True, help="where to write the results (a PNG goes beside it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specray.cluster.app.launcher import LocalCluster
    from specray.cluster.runtime.config import ClusterConfig
    from specray.training.sharegpt import sharegpt_prompts

    levels = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := set(modes) - set(MODES):
        raise ValueError(f"unknown modes {sorted(unknown)}: choose from {', '.join(MODES)}")
    if min(levels) < 1 or args.num_prompts < max(levels):
        raise ValueError("concurrency levels must be >= 1 and at most --num-prompts")
    # Autoregressive first: every other mode's output is checked against it.
    modes = sorted(modes, key=list(MODES).index)
    drafter = args.drafter or (DEFAULT_DRAFTER if args.model == DEFAULT_MODEL else "ngram")
    prompts = [
        p.text
        for p in sharegpt_prompts("heldout", args.num_prompts, args.seed, max_chars=args.max_prompt_chars)
    ]
    if len(prompts) < args.num_prompts:
        raise ValueError(f"only {len(prompts)} held-out ShareGPT prompts fit --max-prompt-chars")
    base = ClusterConfig(
        model=args.model,
        drafter=drafter,
        num_speculative_tokens=args.num_speculative_tokens,
        http_port=0,
        grpc_port=0,
        ray_temp_dir=args.ray_temp_dir,
        verifiers={"torch_threads": args.verifier_threads},
    )

    runs: list[Run] = []
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    progress = tqdm(total=len(modes) * len(levels), desc="bench serve")
    for mode in modes:
        with LocalCluster(base.with_overrides(scheduling=MODES[mode])) as cluster:
            # One short request first: loads, compiles and warms every replica on the path.
            asyncio.run(_load(cluster.grpc_address, prompts[:1], 1, 4))
            for c in levels:
                progress.set_postfix(mode=mode, concurrency=c)
                before = _verifier_counters(cluster.config.redis_url)
                start = time.perf_counter()
                replies = asyncio.run(_load(cluster.grpc_address, prompts, c, args.max_tokens))
                elapsed = time.perf_counter() - start
                after = _verifier_counters(cluster.config.redis_url)
                outputs[mode, c] = [r.token_ids for r in replies]
                reference = outputs.get(("autoregressive", c))
                runs.append(_summarize(mode, c, replies, elapsed, before, after, reference))
                progress.update()
    progress.close()

    report = {
        "model": args.model,
        "drafter": drafter,
        "num_speculative_tokens": args.num_speculative_tokens,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "runs": [asdict(r) for r in runs],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    _print_table(runs)
    _plot(
        runs,
        f"{args.model} + {drafter}, γ={args.num_speculative_tokens}",
        Path(args.json).with_suffix(".png"),
    )
    return 0


# ---- load ----------------------------------------------------------------------------------------
async def _load(address: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[_Reply]:
    """Every prompt once, `concurrency` streams at a time; replies in prompt order."""
    from specray.protos.specray.v1 import generate_pb2, generate_pb2_grpc

    replies: list[_Reply | None] = [None] * len(prompts)
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
                start = last = time.perf_counter()
                tokens: list[int] = []
                ttft, itls = 0.0, []
                async for message in stub.GenerateStream(request):
                    if not message.token_ids:
                        continue
                    now = time.perf_counter()
                    if tokens:
                        itls += [(now - last) / len(message.token_ids)] * len(message.token_ids)
                    else:
                        ttft = now - start
                    tokens += message.token_ids
                    last = now
                replies[i] = _Reply(tokens, ttft, last - start, itls)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return [r for r in replies if r is not None]


def _verifier_counters(redis_url: str) -> dict[str, int]:
    """Every live verifier's draft counters (Stats RPC), summed."""
    from specray.protos.specray.v1 import verify_pb2, verify_pb2_grpc

    totals = dict.fromkeys(("segments", "proposed_drafts", "verified_drafts", "accepted_drafts"), 0)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for key in client.scan_iter(match="specray:verifier:*"):
            with grpc.insecure_channel(client.hget(key, "address")) as channel:
                stats = verify_pb2_grpc.VerifierStub(channel).Stats(verify_pb2.StatsRequest())
            for name in totals:
                totals[name] += getattr(stats, name)
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
    replies: list[_Reply],
    elapsed: float,
    before: dict[str, int],
    after: dict[str, int],
    reference: list[list[int]] | None,
) -> Run:
    delta = {k: after[k] - before[k] for k in after}
    segments = max(delta["segments"], 1)
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
        tau=(segments + delta["accepted_drafts"]) / segments if mode != "autoregressive" else None,
        verify_tokens_per_step=(segments + delta["verified_drafts"]) / segments,
        proposed_tokens_per_step=delta["proposed_drafts"] / segments,
        matches_autoregressive=reference is None or reference == [r.token_ids for r in replies],
        num_requests=len(replies),
        output_tokens=tokens,
        load_avg_1m=os.getloadavg()[0],
    )


# ---- report --------------------------------------------------------------------------------------
def _print_table(runs: list[Run]) -> None:
    print(
        f"{'mode':<15}{'conc':>5}{'tok/s':>9}{'user tok/s':>11}{'TTFT p50':>10}{'ITL p50':>9}"
        f"{'ITL p99':>9}{'tau':>6}{'verify/step':>12}{'sent/step':>10}  matches AR"
    )
    for r in runs:
        tau = f"{r.tau:.2f}" if r.tau is not None else "-"
        print(
            f"{r.mode:<15}{r.concurrency:>5}{r.output_tokens_per_s:>9.1f}{r.per_user_tokens_per_s:>11.2f}"
            f"{r.ttft_p50_s:>10.3f}{r.itl_p50_s:>9.3f}{r.itl_p99_s:>9.3f}{tau:>6}"
            f"{r.verify_tokens_per_step:>12.2f}{r.proposed_tokens_per_step:>10.2f}  {r.matches_autoregressive}"
        )


def _plot(runs: list[Run], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("output_tokens_per_s", "output tokens/s"),
        ("ttft_p50_s", "TTFT p50 (s)"),
        ("itl_p50_s", "inter-token latency p50 (s)"),
        ("verify_tokens_per_step", "verify tokens per request-step"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (field, label) in zip(axes, panels):
        for mode in MODES:
            points = [(r.concurrency, getattr(r, field)) for r in runs if r.mode == mode]
            if points:
                ax.plot(*zip(*points), marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"specray bench serve: {title}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
