"""The local launcher: Redis, a Ray cluster on 127.0.0.1 and the application, torn down together."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import ray
from ray import serve

from specray.cluster.app.application import build_app
from specray.cluster.app.redis_server import LocalRedis, free_port
from specray.cluster.app.serve_config import APP_NAME
from specray.cluster.runtime.config import ClusterConfig


class LocalCluster:
    """`with LocalCluster(config) as cluster:` — `cluster.config` holds the bound ports and Redis URL."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._redis: LocalRedis | None = None
        self._started_ray = False

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    def start(self, timeout_s: float = 600.0) -> LocalCluster:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        config = self.config
        changes = {}
        if config.redis_url is None:
            self._redis = LocalRedis(config.host).start()
            changes["redis_url"] = self._redis.url
        # Port 0 means "any free port"; resolve it here so the addresses can be printed.
        if config.http_port == 0:
            changes["http_port"] = free_port(config.host)
        if config.grpc_port == 0:
            changes["grpc_port"] = free_port(config.host)
        self.config = config = config.with_overrides(**changes)
        if not ray.is_initialized():
            temp_dir = str(Path(config.ray_temp_dir).resolve()) if config.ray_temp_dir else None
            ray.init(
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                _temp_dir=temp_dir,
                log_to_driver=False,
                configure_logging=False,
            )
            self._started_ray = True
        serve.start(http_options={"host": config.host, "port": config.http_port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        self._wait_healthy(timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.http_url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the application was not healthy within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._started_ray:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                self._started_ray = False
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
