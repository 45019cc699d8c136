"""The draft-worker and verifier pools' metrics on the router's `/metrics`, one series per replica.

The replicas publish their counters to Redis (`cluster/runtime/stats_board.py`); the router reads them at
scrape time and this collector turns the latest reports into Prometheus families labelled
`model_name`, `pool` and `replica`. Sum over `replica` for a pool's totals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from specray.cluster.runtime.stats_board import DRAFT_POOL, VERIFIER_POOL, ReplicaReport

# (pool or None for both, report key, family name, counter?, help); counters get `_total` on exposition.
_FAMILIES = (
    (None, "sessions", "specray:pool_sessions", False, "Sessions open on the replica."),
    (
        DRAFT_POOL,
        "sessions",
        "specray:draft_queue_depth",
        False,
        "Sessions a draft worker holds, each waiting for its drafter or its verifier.",
    ),
    (
        VERIFIER_POOL,
        "queued_segments",
        "specray:verifier_queue_depth",
        False,
        "Draft segments waiting for a verifier step.",
    ),
    (DRAFT_POOL, "segments", "specray:pool_segments", True, "Decode segments the draft worker had verified."),
    (DRAFT_POOL, "draft_tokens", "specray:pool_draft_tokens", True, "Draft tokens the draft worker sent."),
    (
        DRAFT_POOL,
        "accepted_tokens",
        "specray:pool_accepted_tokens",
        True,
        "Of those, accepted by a verifier.",
    ),
    (
        DRAFT_POOL,
        "drafter_calls",
        "specray:drafter_calls",
        True,
        "Drafter calls of the draft worker, each proposing for every session ready then.",
    ),
    (
        DRAFT_POOL,
        "drafter_proposals",
        "specray:drafter_proposals",
        True,
        "Proposals those calls made (per call: sessions drafted together).",
    ),
    (DRAFT_POOL, "drafter_seconds", "specray:drafter_seconds", True, "Time spent in the drafter."),
    (VERIFIER_POOL, "batches", "specray:verifier_batches", True, "Verifier steps (one target forward each)."),
    (
        VERIFIER_POOL,
        "batch_tokens",
        "specray:verifier_batch_tokens",
        True,
        "Tokens the verifier's steps carried (prefill, pending and verified drafts).",
    ),
    (
        VERIFIER_POOL,
        "batch_sequences",
        "specray:verifier_batch_sequences",
        True,
        "Sequences the verifier's steps carried.",
    ),
    (
        VERIFIER_POOL,
        "kv_cache_usage",
        "specray:kv_cache_usage_perc",
        False,
        "The share of the verifier's KV-cache blocks in use, 0 to 1 (vLLM's kv_cache_usage_perc).",
    ),
    (
        VERIFIER_POOL,
        "token_budget",
        "specray:verifier_token_budget",
        False,
        "Tokens one verifier step may carry (max_num_batched_tokens).",
    ),
)
_LABELS = ["model_name", "pool", "replica"]


class PoolMetricsCollector(Collector):
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.reports: list[ReplicaReport] = []

    def update(self, reports: list[ReplicaReport]) -> None:
        """The replicas' latest reports (the whole set: a replica missing from it has gone)."""
        self.reports = reports

    def collect(self) -> Iterator[Metric]:
        replicas = GaugeMetricFamily(
            "specray:pool_replicas", "Replicas of the pool reporting stats.", labels=["model_name", "pool"]
        )
        for pool, count in sorted(Counter(r.pool for r in self.reports).items()):
            replicas.add_metric([self.model_name, pool], count)
        yield replicas
        for pool, key, name, is_counter, documentation in _FAMILIES:
            kind = CounterMetricFamily if is_counter else GaugeMetricFamily
            family = kind(name, documentation, labels=_LABELS)
            for report in self.reports:
                if pool in (None, report.pool) and key in report.values:
                    family.add_metric([self.model_name, report.pool, report.replica], report.values[key])
            yield family
