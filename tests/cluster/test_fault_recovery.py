"""Faults on the default deployment, a real local cluster (Ray Serve: one draft worker, one
verifier; Redis; SmolLM2): the only verifier or the only draft worker killed mid-stream, Redis
restarted mid-stream, Redis down. The client's stream waits for Serve's replacement replica and
completes with exactly the greedy output of an uninterrupted run; `/health` follows the verifier
(its heartbeat's TTL) and answers 503 JSON, like `/metrics`, while Redis is down; after a Redis
restart no request trips over a stale pooled connection.

Replicas are killed for real (`ray.kill` on the Serve replica's actor); Redis is a real server
process, stopped and started again on its port (empty: it keeps nothing on disk).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import redis
from cluster_testing import engine_greedy, health

from specray.cluster.app.launcher import LocalCluster
from specray.cluster.app.redis_server import LocalRedis
from specray.cluster.runtime.config import ClusterConfig
from specray.cluster.runtime.session_store import VERIFIER_TTL_S

pytestmark = pytest.mark.slow
PROMPTS = [
    "Write a long story about a dragon who learns to fly.",
    "Explain in detail how a bicycle works.",
    "List twenty animals, one per line.",
]
MAX_TOKENS = 64
KILL_AFTER_TOKENS = 8  # the fault lands here; dozens of tokens are still to come


@pytest.fixture(scope="module")
def redis_server():
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(redis_server, local_cluster_settings):
    # The default pools: one replica each, so a killed one's replacement must take the stream.
    config = ClusterConfig(
        **local_cluster_settings, redis_url=redis_server.url, verifiers={"kv_cache_tokens": 4096}
    )
    with LocalCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def expected(smollm2):
    """The uninterrupted greedy text per prompt (the single-process engine)."""
    reference = engine_greedy(smollm2, PROMPTS, MAX_TOKENS)
    assert all(len(ids) == MAX_TOKENS for _, ids in reference), "too short to be cut mid-stream"
    return [text for text, _ in reference]


def _open_stream(cluster: LocalCluster, prompt: str, session_id: str):
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "session_id": session_id,
    }
    request = urllib.request.Request(
        cluster.http_url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(request, timeout=300)


def _events(reply):
    for line in reply:
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def _stream_with_fault(cluster: LocalCluster, prompt: str, session_id: str, fault) -> tuple[str, object]:
    """The whole streamed text; `fault()` runs once KILL_AFTER_TOKENS tokens have arrived."""
    text, done, fault_result = [], None, None
    with _open_stream(cluster, prompt, session_id) as reply:
        for event in _events(reply):
            assert "error" not in event, event
            if "role" in event["choices"][0]["delta"]:
                continue  # the stream's opening role delta, before any token
            text.append(event["choices"][0]["delta"]["content"])
            # One event per verify step, each committing at least one token.
            if fault is not None and len(text) >= KILL_AFTER_TOKENS:
                fault_result, fault = fault(), None
            done = event["choices"][0]["finish_reason"]
    assert done == "length" and fault is None, "the fault never ran: the stream ended first"
    return "".join(text), fault_result


def _replica_actor(kind: str, replica_id: str):
    """The Serve replica actor behind a verifier/draft-worker id (`<kind>-<replica unique id>`)."""
    unique_id = replica_id.split("-", 1)[1]
    deployment = {"verifier": "Verifier", "draft": "DraftWorker"}[kind]
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#{deployment}#{unique_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(f"no replica actor for {replica_id}")


def _record(cluster: LocalCluster, session_id: str) -> dict[str, str]:
    with redis.Redis.from_url(cluster.config.redis_url, decode_responses=True) as client:
        return client.hgetall(f"specray:session:{session_id}")


def _kill_owner(cluster: LocalCluster, session_id: str, field: str, kind: str) -> str:
    owner = _record(cluster, session_id)[field]
    ray.kill(_replica_actor(kind, owner), no_restart=False)  # Serve replaces it later
    return owner


class HealthWatch:
    """Polls `/health` in the background: [(seconds since start, status)]."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.started = time.monotonic()
        self.seen: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.seen.append((time.monotonic() - self.started, health(self.cluster)[0]))

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.seen


def test_the_only_verifier_killed_mid_stream_is_replaced_and_the_stream_completes(cluster, expected):
    watch: list[HealthWatch] = []

    def kill() -> str:
        killed = _kill_owner(cluster, "kill-verifier", "verifier", "verifier")
        watch.append(HealthWatch(cluster))
        return killed

    text, killed = _stream_with_fault(cluster, PROMPTS[0], "kill-verifier", kill)
    seen = watch[0].stop()
    assert text == expected[0]
    record = _record(cluster, "kill-verifier")
    # Finished on Serve's replacement, which re-prefilled the committed tokens it found in Redis.
    assert record["status"] == "finished" and record["verifier"] != killed
    assert len(json.loads(record["output_ids"])) == MAX_TOKENS
    # Unhealthy once the dead verifier's registration expired, healthy again with the replacement.
    first_unhealthy = next(t for t, status in seen if status == 503)
    assert first_unhealthy <= VERIFIER_TTL_S + 2, seen
    status, body = health(cluster)
    assert status == 200 and body["verifiers"] == 1


def test_the_only_draft_worker_killed_mid_stream_is_replaced_and_the_stream_completes(cluster, expected):
    text, killed = _stream_with_fault(
        cluster, PROMPTS[1], "kill-draft", lambda: _kill_owner(cluster, "kill-draft", "draft_worker", "draft")
    )
    assert text == expected[1]
    record = _record(cluster, "kill-draft")
    assert record["status"] == "finished" and record["draft_worker"] != killed


def _burst(cluster: LocalCluster, n: int) -> list[int]:
    """The statuses of n concurrent short requests."""

    def one(i: int) -> int:
        body = {"prompt": f"Count to {i}:", "max_tokens": 2, "temperature": 0}
        request = urllib.request.Request(
            cluster.http_url + "/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as reply:
                return reply.status
        except urllib.error.HTTPError as err:
            return err.code

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _wait_healthy(cluster: LocalCluster, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while health(cluster)[0] != 200:
        assert time.monotonic() < deadline, "not healthy again"
        time.sleep(0.25)


def test_redis_restarted_mid_stream_sessions_complete_and_no_connection_is_stale(
    cluster, redis_server, expected
):
    # Concurrent requests open several pooled connections to Redis in the router; Redis's restart
    # closes them all.
    assert _burst(cluster, 12) == [200] * 12

    def restart() -> None:
        redis_server.stop()
        redis_server.start()

    text, _ = _stream_with_fault(cluster, PROMPTS[2], "redis-restart", restart)
    # The verifier's bookkeeping writes failed while Redis was down; the stream itself went on.
    assert text == expected[2]
    # The verifier registers again with its next heartbeat; then every request is served: none
    # fails on a pooled connection Redis closed.
    _wait_healthy(cluster)
    assert _burst(cluster, 12) == [200] * 12
    with _open_stream(cluster, PROMPTS[0], "after-restart") as reply:
        events = list(_events(reply))
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == expected[0]


def test_redis_down_makes_health_and_metrics_503_json_then_they_recover(cluster, redis_server):
    redis_server.stop()
    try:
        status, body = health(cluster)
        assert status == 503 and body["status"] == "redis_unavailable" and body["error"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(cluster.http_url + "/metrics", timeout=10)
        assert refused.value.code == 503
        assert refused.value.headers["content-type"] == "application/json"
        error = json.load(refused.value)["error"]
        assert error["type"] == "service_unavailable" and "unreachable" in error["message"]
    finally:
        redis_server.start()
    _wait_healthy(cluster)
    with urllib.request.urlopen(cluster.http_url + "/metrics", timeout=10) as reply:
        assert reply.status == 200 and b"specray:pool_replicas" in reply.read()
