"""Across Ray nodes, on one machine: a head, a draft node and two verifier nodes, each a Ray node of
its own (`specray cluster up`'s launcher) advertising the Helm chart's resource; specray deployed
on them as `specray serve --ray-address` does, from cluster/multinode.yaml (the pools' resources as
the chart gives them) through the Serve config the chart renders; Redis; the real SmolLM2.

Pinned down: each pool's replicas run on the nodes of its resource (seen from the nodes' own
processes and Ray's node table), every socket on loopback; the verifiers register in Redis the
address and node id of the node they run on; HTTP, SSE and gRPC give the in-process engine's greedy
output for 8 concurrent sessions; and a verifier node lost mid-stream (all its processes killed at
once): every stream completes with the same text on the other verifier node, `/health` and the
pool metrics show one verifier fewer, and the pool is whole again once a new verifier node joins.

One cluster serves the module (its start is most of the time); requests stay short.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import ray
from cluster_testing import engine_greedy, health
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from specray.cluster.app.launcher import LocalCluster
from specray.cluster.app.ray_nodes import RayNodes
from specray.cluster.runtime.config import ClusterConfig
from specray.cluster.runtime.node_roles import NODE_ROLES
from specray.cluster.runtime.session_store import VERIFIER_TTL_S
from specray.protos.specray.v1 import generate_pb2, generate_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
REPO = Path(__file__).resolve().parents[2]
NODES = ["head", "draft", "verifier", "verifier"]
# Answers long enough to be cut by the node loss: each runs to MAX_TOKENS (checked).
PROMPTS = [
    "Write a long story about a dragon who learns to fly.",
    "Explain in detail how a bicycle works.",
    "List twenty animals, one per line.",
    "Describe the water cycle step by step.",
    "Write a long poem about the ocean.",
    "Explain how a computer stores numbers.",
    "List the days of the week with a fact about each.",
    "Tell me the history of the printing press in detail.",
]
MAX_TOKENS = 24
LOSS_STREAMS = 4  # in flight when the verifier node goes
DEPLOYMENT_OF_POOL = {"router": "Router", "draft_workers": "DraftWorker", "verifiers": "Verifier"}
REPLICA_TITLE = "ray::ServeReplica:specray:"  # how a Serve replica's process title starts


@pytest.fixture(scope="module")
def nodes(local_cluster_settings):
    directory = REPO / ".scratch" / "mn"  # short: Ray's socket paths live under it
    ray_nodes = RayNodes(directory=directory, state_file=directory / "state.json").up(NODES)
    yield ray_nodes
    ray_nodes.down()


@pytest.fixture(scope="module")
def cluster(nodes):
    config = ClusterConfig.from_yaml(REPO / "cluster" / "multinode.yaml")
    config = config.with_overrides(
        http_port=0,
        grpc_port=0,
        finished_ttl_s=300,
        verifiers={**config.verifiers.model_dump(), "kv_cache_tokens": 4096},
    )
    with LocalCluster(config, ray_address=nodes.address) as running:
        yield running


@pytest.fixture(scope="module")
def expected(smollm2):
    """The in-process engine's greedy text and token ids per prompt."""
    reference = engine_greedy(smollm2, PROMPTS, MAX_TOKENS)
    assert all(len(ids) == MAX_TOKENS for _, ids in reference), "a reference ends early: no stream to cut"
    return reference


# ---- the nodes ----------------------------------------------------------------------------------
def _alive_ray_nodes() -> dict[str, dict]:
    """Ray's node table, alive nodes by name."""
    return {n["NodeName"]: n for n in ray.nodes() if n["Alive"]}


def _command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _deployments_by_node(nodes: RayNodes) -> dict[str, list[str]]:
    """The Serve replicas each node runs, by deployment, seen from the node's own processes."""
    placement = {}
    for node in nodes.nodes:
        titles = [_command_line(p) for p in nodes.processes(node.name)]
        placement[node.name] = sorted(
            # The title names the method a replica runs, if any: `...:Verifier.<method>`.
            t.split()[0][len(REPLICA_TITLE) :].split(".")[0]
            for t in titles
            if t.startswith(REPLICA_TITLE)
        )
    return placement


def _node_listening_on(nodes: RayNodes, port: int) -> tuple[str, str]:
    """(node name, process title) of the process listening on `port`."""
    for node in nodes.nodes:
        for process in nodes.processes(node.name):
            try:
                connections = process.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
                return node.name, _command_line(process)
    raise LookupError(f"no node process listens on port {port}")


def _registered_verifiers(store) -> dict[str, dict]:
    return {key.rsplit(":", 1)[1]: store.hgetall(key) for key in store.scan_iter(match="specray:verifier:*")}


def _node_of_verifier(nodes: RayNodes, store, verifier_id: str) -> str:
    port = int(_registered_verifiers(store)[verifier_id]["address"].rsplit(":", 1)[1])
    return _node_listening_on(nodes, port)[0]


def _wait(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(interval_s)
    return result


# ---- the APIs -----------------------------------------------------------------------------------
def _chat(prompt: str, max_tokens: int = MAX_TOKENS, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def _request(cluster: LocalCluster, body: dict) -> urllib.request.Request:
    return urllib.request.Request(
        cluster.http_url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )


def _http(cluster: LocalCluster, body: dict) -> str:
    with urllib.request.urlopen(_request(cluster, body), timeout=300) as reply:
        return json.load(reply)["choices"][0]["message"]["content"]


def _sse(cluster: LocalCluster, body: dict, on_token=None) -> str:
    """The streamed text; `on_token(text so far)` after each content event."""
    text = []
    with urllib.request.urlopen(_request(cluster, {**body, "stream": True}), timeout=300) as reply:
        for line in reply:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            assert "error" not in event, event
            delta = event["choices"][0]["delta"]
            if "content" in delta:
                text.append(delta["content"])
                if on_token is not None:
                    on_token("".join(text))
    return "".join(text)


def _grpc_stream(
    cluster: LocalCluster, prompt: str, session_id: str, max_tokens: int = MAX_TOKENS
) -> tuple[str, list[int]]:
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        request = generate_pb2.GenerateRequest(
            messages=[generate_pb2.ChatMessage(role="user", content=prompt)],
            max_tokens=max_tokens,
            temperature=0,
            session_id=session_id,
        )
        replies = list(generate_pb2_grpc.GenerationStub(channel).GenerateStream(request, timeout=300))
    return "".join(r.text for r in replies), [t for r in replies for t in r.token_ids]


def _verifier_metrics(cluster: LocalCluster) -> tuple[float, set[str]]:
    """`specray:pool_replicas` of the verifier pool, and the replicas its per-replica series name."""
    with urllib.request.urlopen(cluster.http_url + "/metrics", timeout=10) as reply:
        families = list(text_string_to_metric_families(reply.read().decode()))
    count, replicas = 0.0, set()
    for family in families:
        for sample in family.samples:
            if sample.labels.get("pool") != "verifiers":
                continue
            if sample.name == "specray:pool_replicas":
                count = sample.value
            elif "replica" in sample.labels:
                replicas.add(sample.labels["replica"])
    return count, replicas


# ---- the tests ----------------------------------------------------------------------------------
def test_each_pool_runs_on_the_nodes_that_advertise_its_resource(nodes, cluster):
    ray_nodes = _alive_ray_nodes()
    assert sorted(ray_nodes) == ["draft-1", "head", "verifier-1", "verifier-2"]
    placement = _deployments_by_node(nodes)
    print("\nnode        node id   address    resources                  replicas")
    for name, info in sorted(ray_nodes.items()):
        role = NODE_ROLES[nodes.node(name).role]
        custom = {k: v for k, v in info["Resources"].items() if k.startswith("specray_")}
        print(
            f"{name:<11} {info['NodeID'][:8]}  {info['NodeManagerAddress']}  {json.dumps(custom):<26} {placement[name]}"
        )
        assert info["NodeManagerAddress"] == "127.0.0.1" and custom == role.node_resources
    assert placement == {
        "head": ["Router"],
        "draft-1": ["DraftWorker"],
        "verifier-1": ["Verifier"],
        "verifier-2": ["Verifier"],
    }
    # Every replica's node advertises the resource its pool asks for.
    for pool, deployment in DEPLOYMENT_OF_POOL.items():
        wanted = getattr(cluster.config, pool).resources
        assert wanted, f"cluster/multinode.yaml gives the {pool} no resources"
        for name, deployments in placement.items():
            if deployment in deployments:
                assert wanted.keys() <= ray_nodes[name]["Resources"].keys(), (deployment, name)
    # Serve's controller and its one HTTP proxy on the head only (proxy_location HeadOnly).
    head_titles = " ".join(_command_line(p) for p in nodes.processes("head"))
    assert "ray::ServeController" in head_titles and "ray::ProxyActor" in head_titles
    for name in ("draft-1", "verifier-1", "verifier-2"):
        assert "ray::ProxyActor" not in " ".join(_command_line(p) for p in nodes.processes(name)), name


def test_every_node_listens_on_loopback_only(nodes, cluster):
    listening = 0
    for node in nodes.nodes:
        for process in nodes.processes(node.name):
            for connection in process.net_connections(kind="inet"):
                if connection.status != psutil.CONN_LISTEN:
                    continue
                listening += 1
                if connection.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1"):
                    # Ray Serve binds each replica's inter-deployment gRPC server to [::]:0 itself.
                    assert _command_line(process).startswith(REPLICA_TITLE), (
                        node.name,
                        _command_line(process),
                        connection,
                    )
    assert listening >= 4 * 3  # raylet, agents per node; GCS, Serve, router, verifiers


def test_verifiers_register_the_address_and_id_of_their_node(nodes, cluster, store):
    ray_nodes = _alive_ray_nodes()
    registered = _registered_verifiers(store)
    assert len(registered) == 2, registered
    serving = set()
    for verifier_id, record in registered.items():
        host, port = record["address"].rsplit(":", 1)
        node, title = _node_listening_on(nodes, int(port))
        print(f"\n{verifier_id}: {record['address']} node {record['node_id'][:8]} = {node}")
        assert title.startswith(REPLICA_TITLE + "Verifier")
        assert (host, record["node_id"]) == (ray_nodes[node]["NodeManagerAddress"], ray_nodes[node]["NodeID"])
        serving.add(node)
    assert serving == {"verifier-1", "verifier-2"}


def test_http_sse_and_grpc_equal_the_engine_for_8_concurrent_sessions(cluster, store, expected):
    # Eight sessions at once, over the three APIs: 3 HTTP, 3 SSE, 2 gRPC streams.
    session_ids = [f"multinode-{i}" for i in range(len(PROMPTS))]
    apis = ["HTTP"] * 3 + ["SSE"] * 3 + ["gRPC"] * 2

    def generate(i: int) -> tuple[str, list[int] | None]:
        body = _chat(PROMPTS[i], session_id=session_ids[i])
        if apis[i] == "HTTP":
            return _http(cluster, body), None
        if apis[i] == "SSE":
            return _sse(cluster, body), None
        return _grpc_stream(cluster, PROMPTS[i], session_ids[i])

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        outputs = list(pool.map(generate, range(len(PROMPTS))))
    for i, ((text, ids), (expected_text, expected_ids)) in enumerate(zip(outputs, expected)):
        assert text == expected_text, f"{apis[i]}, prompt {i}: {text!r} != {expected_text!r}"
        assert ids in (None, expected_ids), f"{apis[i]}, prompt {i}: token ids"
    verifiers = {store.hget(f"specray:session:{s}", "verifier") for s in session_ids}
    assert len(verifiers) == 2, f"the sessions did not spread over both verifier nodes: {verifiers}"
    print(
        f"\n8 concurrent greedy sessions ({', '.join(apis)}) equal the in-process engine, on {sorted(verifiers)}"
    )


def test_a_lost_verifier_node_loses_no_stream_and_the_pool_recovers_when_a_node_joins(
    nodes, cluster, store, expected
):
    session_ids = [f"node-loss-{i}" for i in range(LOSS_STREAMS)]
    streaming = [threading.Event() for _ in session_ids]

    def stream(i: int) -> str:
        return _sse(
            cluster, _chat(PROMPTS[i], session_id=session_ids[i]), on_token=lambda _: streaming[i].set()
        )

    with ThreadPoolExecutor(LOSS_STREAMS) as pool:
        texts = [pool.submit(stream, i) for i in range(LOSS_STREAMS)]
        for event in streaming:
            assert event.wait(300), "a stream never started"
        # The verifier serving the most sessions still running, and its node, go.
        records = {s: store.hgetall(f"specray:session:{s}") for s in session_ids}
        running = [r["verifier"] for r in records.values() if r.get("status") == "running"]
        lost = max(set(running), key=running.count)
        cut = [s for s, r in records.items() if r.get("verifier") == lost and r.get("status") == "running"]
        lost_node = _node_of_verifier(nodes, store, lost)
        killed_at = time.monotonic()
        killed = nodes.kill(lost_node)
        print(
            f"\nkilled node {lost_node} ({len(killed)} processes: {killed}) with {len(cut)} stream(s) of {lost} in flight"
        )
        texts = [t.result() for t in texts]

    assert cut, "no stream was in flight on the lost verifier"
    survivor = next(v for v in _registered_verifiers(store) if v != lost)
    for i, session_id in enumerate(session_ids):
        assert texts[i] == expected[i][0], f"stream {i} ({session_id}) differs from the engine"
        record = store.hgetall(f"specray:session:{session_id}")
        assert record["status"] == "finished", (session_id, record)
        if session_id in cut:
            assert record["verifier"] == survivor, (session_id, record)
    print(f"all {len(session_ids)} streams equal the engine; the {len(cut)} cut ones finished on {survivor}")

    # The lost replica drops out of /health (its registration's TTL) and of the pool metrics.
    status, body = _wait(
        lambda: (reply := health(cluster))[1].get("verifiers") == 1 and reply, VERIFIER_TTL_S + 5, "/health"
    )
    count, replicas = _wait(
        lambda: (m := _verifier_metrics(cluster))[0] == 1 and m, 30, "pool_replicas{pool=verifiers} == 1"
    )
    assert status == 200 and lost not in replicas, replicas
    serve_view = serve.status().applications["specray"].deployments["Verifier"].replica_states
    print(
        f"{time.monotonic() - killed_at:.1f} s after the kill: /health {body}; specray:pool_replicas"
        f"{{pool=verifiers}} {count:g}, replicas {sorted(replicas)}; Serve's Verifier replicas {serve_view}"
    )

    # A node with the resource joins: Serve places the missing replica there (the survivor's node
    # has room for one verifier), and the pool is whole again.
    joined = nodes.add("verifier")
    joined_at = time.monotonic()
    recovered = _wait(lambda: health(cluster)[1].get("verifiers") == 2, 240, "the second verifier back", 1.0)
    count, replicas = _wait(lambda: (m := _verifier_metrics(cluster))[0] == 2 and m, 30, "pool_replicas == 2")
    placement = _deployments_by_node(nodes)
    print(
        f"node {joined.name} joined; {time.monotonic() - joined_at:.1f} s later /health verifiers 2,"
        f" pool_replicas {count:g}, placement {placement}"
    )
    assert recovered and placement[joined.name] == ["Verifier"]
    assert placement[_node_of_verifier(nodes, store, survivor)] == ["Verifier"]
    # The new verifier serves: sessions over both verifiers again, with the engine's tokens (gRPC
    # streams of a few tokens, the prefix of the references: greedy decoding).
    session_ids = [f"after-join-{i}" for i in range(4)]
    with ThreadPoolExecutor(len(session_ids)) as pool:
        ids = list(
            pool.map(lambda i: _grpc_stream(cluster, PROMPTS[i], session_ids[i], max_tokens=4)[1], range(4))
        )
    assert ids == [expected_ids[:4] for _, expected_ids in expected[:4]]
    assert len({store.hget(f"specray:session:{s}", "verifier") for s in session_ids}) == 2
