"""Confidence-scheduled verification on a real local cluster (Ray Serve, Redis, gRPC, SmolLM2 with
the bundled DSpark drafter): 16 concurrent greedy requests equal autoregressive decoding, and the
verifier records how many drafts it verified per step."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis

from specray.cluster.app.launcher import LocalCluster
from specray.cluster.runtime.config import ClusterConfig
from specray.protos.specray.v1 import verify_pb2, verify_pb2_grpc
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
GAMMA = 5
MAX_TOKENS = 16
PROMPTS = [
    "What is the capital of Italy?",
    "Name three fruits.",
    "Write one sentence about the moon.",
    "Count from six to ten in words.",
    "What color is the sky on a clear day?",
    "Say goodbye in French.",
    "What is 3 + 4?",
    "Give one synonym for fast.",
    "Name a large ocean.",
    "What do bees make?",
    "List two primary colors.",
    "Write a short greeting for a friend.",
    "What is the opposite of cold?",
    "Name a planet with rings.",
    "How many days are in a week?",
    "What animal says moo?",
]


@pytest.fixture(scope="module")
def cluster(local_cluster_settings):
    config = ClusterConfig(
        drafter="smollm2-135m-dspark",
        num_speculative_tokens=GAMMA,
        scheduling="confidence",
        **local_cluster_settings,
        finished_ttl_s=300,
        verifiers={"kv_cache_tokens": 8192},
    )
    with LocalCluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def autoregressive(smollm2):
    engine = LLMEngine(smollm2, None, EngineConfig(num_speculative_tokens=0, max_num_seqs=16))
    prompts = [engine.encode_prompt(messages=[{"role": "user", "content": p}]) for p in PROMPTS]
    return [s.output_ids for s in engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))]


def _complete(cluster: LocalCluster, prompt: str, session_id: str) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "session_id": session_id,
    }
    request = urllib.request.Request(
        cluster.http_url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.load(reply)


def _verifier_stats(store: redis.Redis) -> list[verify_pb2.StatsReply]:
    stats = []
    for key in store.scan_iter(match="specray:verifier:*"):
        with grpc.insecure_channel(store.hget(key, "address")) as channel:
            stats.append(verify_pb2_grpc.VerifierStub(channel).Stats(verify_pb2.StatsRequest()))
    return stats


def test_sixteen_concurrent_greedy_requests_equal_autoregressive(cluster, autoregressive):
    session_ids = [f"sched-{i}" for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(
            pool.map(lambda i: _complete(cluster, PROMPTS[i], session_ids[i]), range(len(PROMPTS)))
        )

    store = redis.Redis.from_url(cluster.config.redis_url, decode_responses=True)
    try:
        records = [store.hgetall(f"specray:session:{sid}") for sid in session_ids]
        (stats,) = _verifier_stats(store)
    finally:
        store.close()
    assert [json.loads(r["output_ids"]) for r in records] == autoregressive
    assert [r["usage"]["completion_tokens"] for r in replies] == [len(ids) for ids in autoregressive]
    for record in records:
        # One verify length per decode step (the prefill step carries no drafts), each within γ.
        lengths = json.loads(record["verify_lengths"])
        assert len(lengths) == int(record["verify_steps"]) - 1
        assert all(0 <= n <= GAMMA for n in lengths) and sum(lengths) == int(record["draft_tokens"])
    assert stats.scheduling == "confidence"
    assert stats.segments >= sum(len(json.loads(r["verify_lengths"])) for r in records)
    assert stats.accepted_drafts <= stats.verified_drafts <= stats.proposed_drafts
