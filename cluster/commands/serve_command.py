"""`specray serve`: Redis, a local Ray cluster on 127.0.0.1 (or a running one it joins) and the
application, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from specray.cluster.commands.help_text import DRAFTER_HELP
from specray.cluster.commands.status_command import STATE_FILE
from specray.cluster.runtime.config import LOG_LEVELS, ClusterConfig
from specray.defaults import run_dir
from specray.workers.models.dtype import DTYPE_CHOICES


def register(p: argparse.ArgumentParser) -> None:
    # An option left out keeps the config file's value, else the built-in default shown here.
    d = ClusterConfig()
    p.add_argument("--config", help="cluster YAML (models, drafter, γ, pools, autoscaling, Redis)")
    p.add_argument("--model", help=f"packaged name, .gguf file or HF directory (default: {d.model})")
    p.add_argument("--drafter", help=f"{DRAFTER_HELP} (default: {d.drafter})")
    p.add_argument(
        "--num-speculative-tokens",
        "-k",
        type=int,
        help=f"γ: drafts per step (default: {d.num_speculative_tokens})",
    )
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, help=f"engine dtype; auto: bf16 where fast (default: {d.dtype})"
    )
    p.add_argument(
        "--scheduling",
        choices=("confidence", "fixed", "off"),
        help=f"drafts verified per step: DSpark Algorithm 1, all γ, or none (default: {d.scheduling})",
    )
    p.add_argument(
        "--redis-url", help="an existing Redis (default: start a local one, and restart it if it dies)"
    )
    p.add_argument(
        "--host",
        help=f"the address the HTTP and gRPC APIs listen on (default: {d.host}; Ray, Redis and the"
        " internal gRPC stay on 127.0.0.1 whatever this is)",
    )
    p.add_argument("--http-port", type=int, help=f"0: any free port (default: {d.http_port})")
    p.add_argument("--grpc-port", type=int, help=f"0: any free port (default: {d.grpc_port})")
    p.add_argument(
        "--draft-workers",
        type=int,
        help=f"draft worker replicas, a fixed count (default: {d.draft_workers.num_replicas})",
    )
    p.add_argument(
        "--verifiers",
        type=int,
        help=f"verifier replicas, a fixed count (default: {d.verifiers.num_replicas})",
    )
    p.add_argument("--ray-temp-dir", help="Ray's session directory (default: Ray's own, /tmp/ray)")
    p.add_argument(
        "--ray-address",
        help="deploy on this running Ray cluster (its GCS, host:port, e.g. what `specray cluster up`"
        " prints) instead of starting one; it keeps running after Ctrl-C",
    )
    p.add_argument("--api-key", help="the key clients must send (default: $SPECRAY_API_KEY; unset: none)")
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        help=f"generations at once per router; more get HTTP 429 (default: {d.limits.max_concurrent_requests})",
    )
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="console detail: info prints one access-log line per request, warning only problems"
        f" (default: {d.log_level})",
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
        "host": args.host,
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "ray_temp_dir": args.ray_temp_dir,
        "api_key": args.api_key,
        "log_level": args.log_level,
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


def _say(line: str) -> None:
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    from specray.cluster.app.launcher import LocalCluster
    from specray.workers.drafters.registry import check_num_speculative_tokens

    config = load_config(args)
    check_num_speculative_tokens(config.drafter, config.num_speculative_tokens)
    stop = threading.Event()
    print("specray serve: starting (Ctrl-C stops it) ...", flush=True)
    with LocalCluster(
        config, console=_say, state_file=run_dir() / STATE_FILE, ray_address=args.ray_address
    ) as cluster:
        print(
            f"specray is serving {cluster.config.model} (drafter {cluster.config.drafter})\n"
            f"  HTTP (OpenAI): {cluster.http_url}/v1\n"
            f"  gRPC:          {cluster.grpc_address}\n"
            f"  Redis:         {cluster.redis_display_url}\n"
            f"  Ray logs:      {cluster.ray_session_dir}/logs\n"
            "`specray status` shows the cluster; Ctrl-C stops it.",
            flush=True,
        )
        # Installed after ray.init, which sets its own SIGTERM handler; SIGINT too, since a shell
        # that starts us in the background makes us ignore it.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(1.0):
            cluster.watch()
        print("shutting down ...", flush=True)
    print("stopped.", flush=True)
    return 0
