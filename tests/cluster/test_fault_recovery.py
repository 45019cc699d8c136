"""Faults on a real local cluster (Ray Serve: 2 draft workers, 2 verifiers; Redis; SmolLM2): a
verifier or a draft worker killed mid-stream, Redis restarted mid-stream. The client's stream
completes with exactly the greedy output of an uninterrupted run.

Replicas are killed for real (`ray.kill` on the Serve replica's actor); Redis is a real server
process, stopped and started again on its port (empty: it keeps nothing on disk).
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import ray
import redis

from specray.cluster.app.launcher import LocalCluster
from specray.cluster.app.redis_server import LocalRedis
from specray.cluster.runtime.config import ClusterConfig
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams

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
    config = ClusterConfig(
        **local_cluster_settings,
        redis_url=redis_server.url,
        draft_workers={"num_replicas": 2},
        verifiers={"num_replicas": 2, "kv_cache_tokens": 4096},
    )
    with LocalCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def expected(smollm2):
    """The uninterrupted greedy token ids per prompt (the single-process engine)."""
    engine = LLMEngine(smollm2, NgramDrafter(), EngineConfig(num_speculative_tokens=5))
    prompts = [engine.encode_prompt(messages=[{"role": "user", "content": p}]) for p in PROMPTS]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    assert all(len(s.output_ids) == MAX_TOKENS for s in seqs)  # long enough to be cut mid-stream
    return [engine.output_text(s) for s in seqs]


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


def test_verifier_killed_mid_stream_resumes_with_identical_output(cluster, expected):
    text, killed = _stream_with_fault(
        cluster,
        PROMPTS[0],
        "kill-verifier",
        lambda: _kill_owner(cluster, "kill-verifier", "verifier", "verifier"),
    )
    assert text == expected[0]
    record = _record(cluster, "kill-verifier")
    # Finished on the other verifier, which re-prefilled the committed tokens it found in Redis.
    assert record["status"] == "finished" and record["verifier"] != killed
    assert len(json.loads(record["output_ids"])) == MAX_TOKENS


def test_draft_worker_killed_mid_stream_resumes_with_identical_output(cluster, expected):
    text, killed = _stream_with_fault(
        cluster, PROMPTS[1], "kill-draft", lambda: _kill_owner(cluster, "kill-draft", "draft_worker", "draft")
    )
    assert text == expected[1]
    record = _record(cluster, "kill-draft")
    assert record["status"] == "finished" and record["draft_worker"] != killed


def _healthy(cluster: LocalCluster) -> bool:
    try:
        with urllib.request.urlopen(cluster.http_url + "/health", timeout=10) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_redis_restarted_mid_stream_sessions_complete(cluster, redis_server, expected):
    def restart() -> None:
        redis_server.stop()
        redis_server.start()

    text, _ = _stream_with_fault(cluster, PROMPTS[2], "redis-restart", restart)
    # The verifier's bookkeeping writes failed while Redis was down; the stream itself went on.
    assert text == expected[2]
    # The verifiers register again with their next heartbeat; then new requests are served.
    deadline = time.monotonic() + 120
    while not _healthy(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    with _open_stream(cluster, PROMPTS[0], "after-restart") as reply:
        events = list(_events(reply))
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == expected[0]
