"""Tracing, pool metrics and autoscaling on a real local cluster (Ray Serve, Redis, gRPC, SmolLM2).

Every role exports its spans over OTLP/gRPC to a collector this test runs on 127.0.0.1, which keeps
them in memory. Both pools autoscale between 1 and 2 replicas on the speculation-aware policies,
with short delays.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from specray.cluster.app.launcher import LocalCluster
from specray.cluster.app.serve_config import APP_NAME
from specray.cluster.runtime.config import ClusterConfig
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
MAX_TOKENS = 48
# Greedy SmolLM2 + n-gram drafts: the first prompt's drafts are mostly rejected, the second's
# mostly accepted (the `acceptance` fixture measures both with the single-process engine).
LOW_ACCEPTANCE = "Describe a sunset over the sea in vivid words."  # n-gram acceptance ~0.05 in fp32 and bf16
HIGH_ACCEPTANCE = "Repeat exactly: red green blue red green blue red green blue red green blue"
MIN_ACCEPTANCE_RATE = 0.5
TOKEN_BUDGET = 16


class SpanCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver keeping (resource attributes, span) pairs in memory."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], object]] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(resource, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[tuple[dict[str, str], object]]:
        with self._lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def collector():
    spans = SpanCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(spans, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield spans, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def cluster(collector, local_cluster_settings):
    pacing = {
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2.0,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 3.0,
    }
    config = ClusterConfig(
        **local_cluster_settings,
        tracing={"otlp_endpoint": collector[1]},
        # Verify every draft, as the `acceptance` reference run does: confidence scheduling would
        # verify only the leading drafts, whose acceptance is higher than the reference measures.
        scheduling="fixed",
        draft_workers={
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 2,
                "min_acceptance_rate": MIN_ACCEPTANCE_RATE,
                **pacing,
            }
        },
        verifiers={
            # Three sessions per verifier; a budget-driven scale-up would need saturated steps.
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 3,
                "target_budget_utilization": 1.0,
                **pacing,
            },
            "kv_cache_tokens": 4096,
            "max_num_batched_tokens": TOKEN_BUDGET,
        },
    )
    with LocalCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def acceptance(smollm2) -> dict[str, float]:
    engine = LLMEngine(smollm2, NgramDrafter(), EngineConfig(num_speculative_tokens=5))
    rates = {}
    for prompt in (LOW_ACCEPTANCE, HIGH_ACCEPTANCE):
        ids = engine.encode_prompt(messages=[{"role": "user", "content": prompt}])
        [seq] = engine.generate([ids], SamplingParams(max_tokens=MAX_TOKENS))
        rates[prompt] = seq.stats.accepted_tokens / seq.stats.draft_tokens
    return rates


def _chat(cluster: LocalCluster, prompt: str, **extra) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }
    request = urllib.request.Request(
        cluster.http_url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.load(reply)


def _metrics(cluster: LocalCluster) -> dict[str, list]:
    with urllib.request.urlopen(cluster.http_url + "/metrics") as reply:
        text = reply.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _wait_for(condition, what: str, timeout_s: float = 120.0, on_poll=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if on_poll is not None:
            on_poll()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}")


def test_one_request_is_one_trace_across_the_three_roles(cluster, collector):
    spans, _ = collector
    reply = _chat(cluster, "Name two planets.", session_id="traced")
    assert reply["usage"]["completion_tokens"] > 0

    def trace_of_request():
        found = spans.snapshot()
        roots = [
            s
            for _, s in found
            if s.name == "specray.request"
            and any(a.key == "specray.session_id" and a.value.string_value == "traced" for a in s.attributes)
        ]
        if not roots:
            return None
        members = [(r, s) for r, s in found if s.trace_id == roots[0].trace_id]
        names = {s.name for _, s in members}
        # The verifier exports its step spans in batches, the last after the router has answered:
        # wait until every verify step's span has arrived.
        steps = sum(s.name == "specray.verify" for _, s in members)
        done = {"specray.draft_session", "specray.draft", "specray.verify", "specray.accept"} <= names
        done = done and steps >= reply["speculation"]["verify_steps"]
        return members if done else None

    members = _wait_for(trace_of_request, "the request's spans from all three roles", timeout_s=60)
    assert {r["specray.role"] for r, _ in members} == {"router", "draft_worker", "verifier"}
    # Connected: one root, and every other span's parent is a span of the same trace.
    ids = {s.span_id for _, s in members}
    # One root, in the router: the request span or, where Serve's ingress wraps it in an HTTP
    # server span of its own (it does once a tracer provider is set), that span.
    roots = [(r["specray.role"], s.name) for r, s in members if not s.parent_span_id]
    assert len(roots) == 1 and roots[0][0] == "router", roots
    assert all(s.parent_span_id in ids for _, s in members if s.parent_span_id)

    def attributes(span) -> dict:
        return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}

    by_id = {s.span_id: s for _, s in members}
    drafts = [s for _, s in members if s.name == "specray.draft"]
    verifies = [s for _, s in members if s.name == "specray.verify"]
    # Every verify step of the session: the prefill and one per draft segment.
    assert len(verifies) == len(drafts) + 1 == reply["speculation"]["verify_steps"]
    assert (
        sum(attributes(s).get("specray.accepted", 0) for s in drafts)
        == reply["speculation"]["accepted_tokens"]
    )
    assert all(attributes(s)["specray.segment_length"] >= 0 for s in drafts)
    assert (
        sum(attributes(s).get("specray.verified_drafts", 0) for s in verifies)
        == reply["speculation"]["draft_tokens"]
    )
    for verify in verifies:
        values = attributes(verify)
        assert values["specray.session_id"] == "traced" and values["specray.batch_size"] >= 1
        assert values["specray.batch_tokens"] >= 1 and values["specray.token_budget"] == TOKEN_BUDGET
        assert by_id[verify.parent_span_id].name == "specray.draft_session"
        phases = sorted(
            (s for _, s in members if s.parent_span_id == verify.span_id),
            key=lambda s: s.start_time_unix_nano,
        )
        assert [s.name for s in phases] == ["specray.schedule", "specray.forward", "specray.accept"]
        assert phases[0].start_time_unix_nano == verify.start_time_unix_nano
        assert phases[-1].end_time_unix_nano == verify.end_time_unix_nano


def test_metrics_show_both_pools_per_replica(cluster):
    _chat(cluster, "Say hello in Spanish.")

    def consistent():
        metrics = _metrics(cluster)
        router_drafts = sum(
            s.value for s in metrics["specray:spec_decode_num_draft_tokens"] if s.name.endswith("_total")
        )
        pool_drafts = sum(s.value for s in metrics["specray:pool_draft_tokens"] if s.name.endswith("_total"))
        # The draft workers publish every 2 s: wait until their counts have caught up with the router's.
        return metrics if router_drafts > 0 and pool_drafts == router_drafts else None

    metrics = _wait_for(consistent, "the draft pool's counters to match the router's", timeout_s=30)
    replicas = {s.labels["pool"]: s.value for s in metrics["specray:pool_replicas"]}
    assert replicas == {"draft_workers": 1, "verifiers": 1}
    for name in ("specray:pool_sessions", "specray:draft_queue_depth", "specray:verifier_queue_depth"):
        assert metrics[name], name
    router_accepted = sum(
        s.value for s in metrics["specray:spec_decode_num_accepted_tokens"] if s.name.endswith("_total")
    )
    assert (
        sum(s.value for s in metrics["specray:pool_accepted_tokens"] if s.name.endswith("_total"))
        == router_accepted
    )
    [budget] = metrics["specray:verifier_token_budget"]
    assert budget.value == TOKEN_BUDGET and budget.labels["replica"].startswith("verifier-")
    [batches] = [s for s in metrics["specray:verifier_batches"] if s.name.endswith("_total")]
    [tokens] = [s for s in metrics["specray:verifier_batch_tokens"] if s.name.endswith("_total")]
    assert batches.value >= 2 and tokens.value >= batches.value


def _running(deployment: str) -> int:
    status = serve.status().applications[APP_NAME].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


class Load:
    """`clients` threads sending one prompt after another until the prompt is set to None."""

    def __init__(self, cluster: LocalCluster, prompt: str, clients: int) -> None:
        self.prompt: str | None = prompt
        self._threads = [threading.Thread(target=self._run, args=(cluster,)) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, cluster: LocalCluster) -> None:
        while (prompt := self.prompt) is not None:
            _chat(cluster, prompt)

    def stop(self) -> None:
        self.prompt = None
        for thread in self._threads:
            thread.join()


def test_load_grows_the_right_pool_and_idleness_shrinks_both(cluster, acceptance):
    assert acceptance[LOW_ACCEPTANCE] < MIN_ACCEPTANCE_RATE < acceptance[HIGH_ACCEPTANCE]
    _wait_for(lambda: (_running("DraftWorker"), _running("Verifier")) == (1, 1), "one replica per pool")
    # The earlier tests' drafts (well accepted) leave Serve's look-back window first.
    time.sleep(3.0)
    draft_workers_seen = []
    load = Load(cluster, LOW_ACCEPTANCE, clients=4)
    try:
        # Four sessions are twice the draft pool's target, but their drafts are mostly rejected:
        # only the verifiers (over their three sessions each) get a second replica.
        _wait_for(
            lambda: _running("Verifier") == 2,
            "a second verifier",
            on_poll=lambda: draft_workers_seen.append(_running("DraftWorker")),
        )
        # Give the draft pool's policy more decisions under the same load than it took the verifiers.
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            draft_workers_seen.append(_running("DraftWorker"))
            time.sleep(0.5)
        assert max(draft_workers_seen) == 1
        # The same load with drafts the verifiers accept: now the draft pool grows.
        load.prompt = HIGH_ACCEPTANCE
        _wait_for(lambda: _running("DraftWorker") == 2, "a second draft worker")
    finally:
        load.stop()
    _wait_for(
        lambda: (_running("DraftWorker"), _running("Verifier")) == (1, 1), "both pools back to one replica"
    )
