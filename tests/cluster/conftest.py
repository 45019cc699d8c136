"""What every local test cluster shares."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def local_cluster_settings() -> dict:
    """ClusterConfig fields for a test cluster: ports picked by the OS, and Ray's state (it keeps
    some under HOME) and temp dir inside the repository's scratch space."""
    home = REPO / ".scratch" / "home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(home)
    return {"http_port": 0, "grpc_port": 0, "ray_temp_dir": str(REPO / ".scratch" / "ray")}


@pytest.fixture(scope="session")
def smollm2():
    """The real default target in the dtype a default cluster serves it in (`auto`), so the
    in-process references these tests compare the cluster's output with decode in that dtype too."""
    from specray.workers.models.loader import load_model

    return load_model("smollm2-135m", "auto")


@pytest.fixture(scope="module")
def store(cluster):
    """A Redis client on the module's cluster's Redis."""
    client = redis.Redis.from_url(cluster.config.redis_url, decode_responses=True)
    yield client
    client.close()
