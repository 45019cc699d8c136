"""Cluster config validation, the local Redis server and the session store (real Redis, no Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pydantic
import pytest

from specray.cluster.app.redis_server import LocalRedis
from specray.cluster.commands.serve_command import load_config
from specray.cluster.runtime.config import ClusterConfig
from specray.cluster.runtime.session_store import SessionStore

EXAMPLE = Path(__file__).resolve().parents[3] / "cluster" / "cluster.yaml"


def test_example_yaml_drives_pools():
    config = ClusterConfig.from_yaml(EXAMPLE)
    options = config.verifiers.deployment_options()
    assert options["autoscaling_config"]["max_replicas"] == 2 and "num_replicas" not in options
    assert config.router.deployment_options()["num_replicas"] == 1


@pytest.mark.parametrize(
    "data",
    [
        {"num_speculative_tokens": -1},
        {"verifiers": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}},
        {"unknown_field": 1},
        {"draft_workers": {"num_replicas": 0}},
    ],
)
def test_bad_config_is_rejected(data):
    with pytest.raises(pydantic.ValidationError):
        ClusterConfig.model_validate(data)


def test_serve_flags_override_yaml():
    from specray.cluster.commands.cli import build_parser

    argv = ["serve", "--config", str(EXAMPLE), "--verifiers", "2", "-k", "3", "--scheduling", "off"]
    config = load_config(build_parser().parse_args(argv))
    assert config.num_speculative_tokens == 3 and config.scheduling == "off"
    assert config.verifiers.deployment_options()["num_replicas"] == 2
    assert config.verifiers.kv_cache_tokens == 32768  # the rest of the YAML stays


def test_the_default_drafter_follows_the_model():
    """Unset, the drafter is the bundled hybrid for the default model and n-gram lookup for any
    other (no bundled drafter fits it), also when a flag changes the model of a config."""
    assert ClusterConfig().drafter == "hybrid:smollm2-135m-dspark"
    assert ClusterConfig(model="gemma3-270m").drafter == "ngram"
    assert ClusterConfig().with_overrides(model="gemma3-270m").drafter == "ngram", (
        "the default model's drafter stayed with another model"
    )
    named = ClusterConfig(drafter="none").with_overrides(model="gemma3-270m")
    assert named.drafter == "none", "a named drafter was replaced by the default"


def test_session_store_on_real_redis():
    async def scenario(url: str) -> None:
        store = SessionStore(url, session_ttl_s=30, finished_ttl_s=5)
        await store.open_session("s1", "verifier-a", "draft-a", [1, 2, 3], {"max_tokens": 4})
        await store.record_step("s1", [7], kv_len=3, num_drafts=2, accepted=1, finish_reason=None)
        record = await store.get_session("s1")
        assert (
            record["status"] == "running"
            and record["output_ids"] == "[7]"
            and record["accepted_tokens"] == "1"
        )
        assert 0 < await store.redis.ttl("specray:session:s1") <= 30
        await store.record_step("s1", [7, 8], kv_len=4, num_drafts=0, accepted=0, finish_reason="length")
        record = await store.get_session("s1")
        assert record["status"] == "finished" and record["verify_steps"] == "2"
        assert 0 < await store.redis.ttl("specray:session:s1") <= 5
        await store.heartbeat_verifier("verifier-a", "127.0.0.1:1234", 3, ttl_s=10, node_id="ab12")
        assert [(v.verifier_id, v.address, v.active_sessions) for v in await store.live_verifiers()] == [
            ("verifier-a", "127.0.0.1:1234", 3)
        ]
        assert await store.redis.hget("specray:verifier:verifier-a", "node_id") == "ab12"
        await store.unregister_verifier("verifier-a")
        await store.delete_session("s1")
        assert await store.live_verifiers() == [] and await store.session_ids() == []
        await store.close()

    with LocalRedis() as server:
        assert server.host == "127.0.0.1"
        asyncio.run(scenario(server.url))
