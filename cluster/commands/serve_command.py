"""`specray serve`: Redis, a local Ray cluster on 127.0.0.1 and the application, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from specray.cluster.app.launcher import LocalCluster
from specray.cluster.runtime.config import ClusterConfig
from specray.workers.drafters.registry import DRAFTER_CHOICES_HELP, check_num_speculative_tokens
from specray.workers.models.dtype import DTYPE_CHOICES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the cluster locally: HTTP (OpenAI) and gRPC APIs")
    p.add_argument("--config", help="cluster YAML (models, drafter, γ, pools, autoscaling, Redis)")
    p.add_argument("--model", help="packaged name, .gguf file or HF directory")
    p.add_argument("--drafter", help=DRAFTER_CHOICES_HELP)
    p.add_argument("--num-speculative-tokens", "-k", type=int)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="engine dtype (default: auto, bf16 where fast)")
    p.add_argument(
        "--scheduling",
        choices=("confidence", "fixed", "off"),
        help="drafts verified per step: DSpark Algorithm 1, all γ, or none (autoregressive)",
    )
    p.add_argument("--redis-url", help="an existing Redis; by default a local one is started")
    p.add_argument("--http-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--draft-workers", type=int, help="draft worker replicas (fixed count)")
    p.add_argument("--verifiers", type=int, help="verifier replicas (fixed count)")
    p.add_argument("--ray-temp-dir", help="Ray's session directory (default: Ray's own)")
    p.add_argument("--api-key", help="the key clients must send (default: $SPECRAY_API_KEY; unset: none)")
    p.add_argument(
        "--max-concurrent-requests", type=int, help="generations at once per router; more get HTTP 429"
    )
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace) -> ClusterConfig:
    config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    changes = {
        "model": args.model,
        "drafter": args.drafter,
        "num_speculative_tokens": args.num_speculative_tokens,
        "dtype": args.dtype,
        "scheduling": args.scheduling,
        "redis_url": args.redis_url,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "ray_temp_dir": args.ray_temp_dir,
        "api_key": args.api_key,
    }
    if args.max_concurrent_requests is not None:
        changes["limits"] = {
            **config.limits.model_dump(),
            "max_concurrent_requests": args.max_concurrent_requests,
        }
    if args.draft_workers is not None:
        changes["draft_workers"] = {
            **config.draft_workers.model_dump(),
            "num_replicas": args.draft_workers,
            "autoscaling": None,
        }
    if args.verifiers is not None:
        changes["verifiers"] = {
            **config.verifiers.model_dump(),
            "num_replicas": args.verifiers,
            "autoscaling": None,
        }
    return config.with_overrides(**changes)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    check_num_speculative_tokens(config.drafter, config.num_speculative_tokens)
    stop = threading.Event()
    print("starting Redis, Ray and the application (the first start converts the model) ...", flush=True)
    with LocalCluster(config) as cluster:
        print(
            f"specray is serving {cluster.config.model} (drafter {cluster.config.drafter})\n"
            f"  HTTP (OpenAI): {cluster.http_url}/v1\n"
            f"  gRPC:          {cluster.grpc_address}\n"
            f"  Redis:         {cluster.config.redis_url}\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        # Installed after ray.init, which sets its own SIGTERM handler; SIGINT too, since a shell
        # that starts us in the background makes us ignore it.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        print("shutting down ...", flush=True)
    return 0
