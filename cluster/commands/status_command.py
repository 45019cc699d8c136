"""`specray status`: what a running cluster is doing, from its router and its Redis.

The router's `/health` and `/metrics` give health and request counts; Redis gives the verifier
registry, every draft worker's and verifier's latest report, the sessions, and Serve's view of the
deployments (which `specray serve` keeps there). No Ray connection is needed. By default the
addresses come from the file a local `specray serve` writes in its run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

from specray.defaults import run_dir

STATE_FILE = "serve.json"  # written by `specray serve` (cluster/commands/serve_command.py)
_TIMEOUT_S = 5.0


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the router's HTTP address (default: the local `specray serve`'s)")
    p.add_argument("--redis-url", help="the cluster's Redis (default: the local `specray serve`'s)")
    p.add_argument("--json", action="store_true", help="print everything gathered as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    state_path = run_dir() / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    url = args.url or state.get("http_url")
    redis_url = args.redis_url or state.get("redis_url")
    if url is None and redis_url is None:
        raise FileNotFoundError(
            f"no local `specray serve` is running ({state_path} is missing): give --url and --redis-url"
        )
    report: dict[str, Any] = {"pid": state.get("pid"), "ray_session_dir": state.get("ray_session_dir")}
    if url is not None:
        report["router"] = _router(url.rstrip("/"))
    if redis_url is not None:
        report["redis"] = _redis(redis_url)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_render(report))
    healthy = report.get("router", {}).get("health", {}).get("status") == "ok"
    return 0 if healthy else 1


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:  # a 503 still carries a body worth showing
        return err.code, err.read()


def _router(url: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    router: dict[str, Any] = {"url": url}
    try:
        status, body = _get(f"{url}/health")
        router["health"] = {"http_status": status, **json.loads(body or b"{}")}
        status, body = _get(f"{url}/metrics")
    except (OSError, ValueError) as err:
        router["error"] = f"unreachable: {err}"
        return router
    if status != 200:
        router["metrics_error"] = f"/metrics answered {status}: {body.decode(errors='replace')}"
        return router
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.endswith("_created") or sample.name.endswith("_bucket"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    router["metrics"] = samples
    return router


def _redis(url: str) -> dict[str, Any]:
    import redis

    from specray.cluster.runtime.redis_client import redacted
    from specray.cluster.runtime.session_store import SESSION_PREFIX, VERIFIER_PREFIX
    from specray.cluster.runtime.stats_board import SERVE_STATUS_KEY, STATS_PREFIX

    found: dict[str, Any] = {"url": redacted(url)}
    client = redis.Redis.from_url(
        os.path.expandvars(url),
        decode_responses=True,
        socket_timeout=_TIMEOUT_S,
        socket_connect_timeout=_TIMEOUT_S,
    )
    try:
        info = client.info()
        found["server"] = {
            key: info.get(key)
            for key in ("redis_version", "uptime_in_seconds", "used_memory_human", "connected_clients")
        }
        found["verifiers"] = [
            {"id": key[len(VERIFIER_PREFIX) :], **client.hgetall(key), "expires_in_s": client.ttl(key)}
            for key in sorted(client.scan_iter(match=VERIFIER_PREFIX + "*"))
        ]
        found["replicas"] = [
            {
                "pool": key[len(STATS_PREFIX) :].split(":", 1)[0],
                "replica": key[len(STATS_PREFIX) :].split(":", 1)[1],
            }
            | {k: float(v) for k, v in client.hgetall(key).items()}
            for key in sorted(client.scan_iter(match=STATS_PREFIX + "*"))
        ]
        statuses: dict[str, int] = {}
        for key in client.scan_iter(match=SESSION_PREFIX + "*"):
            status = client.hget(key, "status") or "unknown"
            statuses[status] = statuses.get(status, 0) + 1
        found["sessions"] = statuses
        serve_status = client.get(SERVE_STATUS_KEY)
        found["deployments"] = json.loads(serve_status) if serve_status else None
    except redis.RedisError as err:
        found["error"] = f"unreachable: {err}"
    finally:
        client.close()
    return found


def _render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    router = report.get("router")
    if router is not None:
        lines.append(
            f"router {router['url']}" + (f" (specray serve pid {report['pid']})" if report["pid"] else "")
        )
        if "error" in router:
            lines.append(f"  {router['error']}")
        else:
            health = router["health"]
            lines.append(
                f"  health:     {health.get('status')} (HTTP {health['http_status']}): "
                f"{health.get('verifiers', 0)} verifier(s), {health.get('draft_workers', 0)} draft worker(s)"
                + (f" — {health['error']}" if "error" in health else "")
            )
        if "metrics_error" in router:
            lines.append(f"  metrics:    {router['metrics_error']}")
        if "metrics" in router:
            lines += _render_requests(router["metrics"])
    found = report.get("redis")
    if found is not None:
        lines += _render_redis(found)
    if report.get("ray_session_dir"):
        lines.append(
            f"logs: {report['ray_session_dir']}/logs (worker-*.err/.out per process, serve/ per replica)"
        )
    return "\n".join(lines)


def _render_requests(metrics: dict[str, float]) -> list[str]:
    def total(prefix: str) -> dict[str, float]:
        return {k[len(prefix) :].strip("{}"): v for k, v in metrics.items() if k.startswith(prefix)}

    finished = total("specray:request_success_total")
    failed = total("specray:request_failure_total")
    by_reason = ", ".join(f"{k.split('=', 1)[1]} {v:g}" for k, v in sorted(finished.items()) if v)
    failures = ", ".join(f"{k.split('=', 1)[1]} {v:g}" for k, v in sorted(failed.items()) if v)
    drafted = metrics.get("specray:spec_decode_num_draft_tokens_total", 0.0)
    accepted = metrics.get("specray:spec_decode_num_accepted_tokens_total", 0.0)
    return [
        f"  requests:   {metrics.get('specray:num_requests_running', 0):g} running, "
        f"{metrics.get('specray:num_requests_waiting', 0):g} waiting; "
        f"{sum(finished.values()):g} finished ({by_reason or 'none'}), {sum(failed.values()):g} failed"
        + (f" ({failures})" if failures else ""),
        f"  tokens:     {metrics.get('specray:prompt_tokens_total', 0):g} prompt, "
        f"{metrics.get('specray:generation_tokens_total', 0):g} generated; drafts accepted "
        + (f"{accepted:g} of {drafted:g} ({accepted / drafted:.0%})" if drafted else "none yet"),
    ]


def _render_redis(found: dict[str, Any]) -> list[str]:
    lines = [f"redis {found['url']}"]
    if "error" in found:
        return [*lines, f"  {found['error']}"]
    server = found["server"]
    lines.append(
        f"  server:     Redis {server['redis_version']}, up {server['uptime_in_seconds']} s, "
        f"{server['used_memory_human']} used, {server['connected_clients']} clients"
    )
    sessions = found["sessions"]
    lines.append(
        f"  sessions:   {sum(sessions.values())}"
        + (" (" + ", ".join(f"{n} {s}" for s, n in sorted(sessions.items())) + ")" if sessions else "")
    )
    if found["deployments"] is not None:
        lines.append("deployments (Serve)")
        for name, deployment in found["deployments"].items():
            replicas = ", ".join(f"{n} {s.lower()}" for s, n in sorted(deployment["replicas"].items()) if n)
            lines.append(f"  {name:<12} {deployment['status'].lower():<10} {replicas or 'no replicas'}")
    lines.append("verifiers (registered)")
    for v in found["verifiers"] or [{"id": "none"}]:
        if "address" in v:
            node = f"node {v['node_id'][:8]}, " if v.get("node_id") else ""
            lines.append(
                f"  {v['id']:<28} {v['address']:<22} {node}{v.get('active_sessions', 0)} session(s), "
                f"registration expires in {v['expires_in_s']} s"
            )
        else:
            lines.append("  none: requests get 503 until a verifier registers")
    lines.append("pools (each replica's latest report)")
    for r in found["replicas"]:
        if r["pool"] == "verifiers":
            detail = (
                f"{r.get('sessions', 0):g} session(s), {r.get('queued_segments', 0):g} queued, "
                f"{r.get('batches', 0):g} steps, KV cache {r.get('kv_cache_usage', 0):.1%}"
            )
        else:
            detail = (
                f"{r.get('sessions', 0):g} session(s), {r.get('draft_tokens', 0):g} draft tokens, "
                f"{r.get('accepted_tokens', 0):g} accepted"
            )
        lines.append(f"  {r['pool']:<14} {r['replica']:<28} {detail}")
    if not found["replicas"]:
        lines.append("  none reporting")
    return lines
