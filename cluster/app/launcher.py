"""The local launcher: Redis, a Ray cluster on 127.0.0.1 and the application, torn down together.

Everything listens on 127.0.0.1 except the HTTP and gRPC APIs, which listen on `config.host`. Given
the address of a running Ray cluster (`ray_address`), it joins that one instead of starting one, and
leaves it running when it stops. Either way it deploys the Serve config the Helm chart renders
(cluster/app/serve_config.py), so each pool lands where its `resources` say.
Progress and events go to `console` (a callable taking one line; `specray serve` prints them):
the model preparation, Ray's start, each deployment's replicas, and later, from `watch()`, a
replica lost and replaced or a Redis restarted. The replicas' own log lines (the router's access
log, warnings) reach the same console through Ray's log streaming.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import ray
import redis
from ray import serve
from ray._private import ray_constants
from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default
from ray.serve.exceptions import RayServeException

from specray.cluster.app.ray_auth import ray_auth_token_file
from specray.cluster.app.redis_server import LocalRedis, free_port
from specray.cluster.app.serve_config import APP_NAME, serve_config
from specray.cluster.runtime.config import ClusterConfig, Pool
from specray.cluster.runtime.redis_client import redacted
from specray.cluster.runtime.stats_board import SERVE_STATUS_KEY

LOOPBACK = "127.0.0.1"
_SERVE_STATUS_TTL_S = 10  # `watch()` refreshes it every second or so
Console = Callable[[str], None]


class LocalCluster:
    """`with LocalCluster(config) as cluster:` — `cluster.config` holds the bound ports and Redis URL.

    `console`: where progress and events go, and with it Ray streams the replicas' own output to
    this process's stdout and stderr; None (tests, benchmarks): quiet, the replicas' output stays
    in Ray's log files. `state_file`: where to write the running cluster's addresses for `specray
    status` (removed on stop); None writes none. `ray_address`: a running Ray cluster's GCS
    (host:port) to deploy on; None starts a single-node cluster here.
    """

    def __init__(
        self,
        config: ClusterConfig,
        console: Console | None = None,
        state_file: Path | None = None,
        ray_address: str | None = None,
    ):
        self.config = config
        self._say = console or (lambda line: None)
        self._stream_replica_output = console is not None
        self._state_file = state_file
        self._ray_address = ray_address
        self._redis: LocalRedis | None = None
        self._connected_ray = False
        self._replicas: dict[str, str] = {}  # deployment → its replica states, as last reported

    @property
    def http_url(self) -> str:
        return f"http://{_dialable(self.config.host)}:{self.config.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{_dialable(self.config.host)}:{self.config.grpc_port}"

    @property
    def redis_display_url(self) -> str:
        """The Redis URL without its password, for the console."""
        return redacted(self.config.redis_url or "")

    @property
    def ray_session_dir(self) -> Path:
        """The Ray session of the node this process is attached to (a joined cluster's head)."""
        if self._connected_ray and self._ray_address is not None:
            return Path(ray.get_runtime_context().get_temp_dir()) / "session_latest"
        return Path(self.config.ray_temp_dir or "/tmp/ray").resolve() / "session_latest"

    def start(self, timeout_s: float = 600.0) -> LocalCluster:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        config = self.config
        self._prepare()
        changes = {}
        if config.redis_url is None:
            self._redis = LocalRedis(LOOPBACK).start()
            changes["redis_url"] = self._redis.url
            self._say(f"Redis: started on {self._redis.url} (pid {self._redis.pid}), restarted if it dies")
        # Port 0 means "any free port"; resolve it here so the addresses can be printed.
        if config.http_port == 0:
            changes["http_port"] = free_port(config.host)
        if config.grpc_port == 0:
            changes["grpc_port"] = free_port(config.host)
        self.config = config = config.with_overrides(**changes)
        if ray.is_initialized() and self._ray_address is not None:
            raise RuntimeError(
                f"this process is attached to a Ray cluster already: cannot join {self._ray_address}"
            )
        if not ray.is_initialized():
            if self._ray_address is None:
                self._say("Ray: starting a local cluster on 127.0.0.1 ...")
            else:
                self._say(f"Ray: joining the cluster at {self._ray_address} ...")
            self._init_ray()
            self._connected_ray = True
        pools = f"router, {_replicas(config.draft_workers)} draft worker(s), {_replicas(config.verifiers)} verifier(s)"
        self._say(f"application: deploying {pools} ...")
        self._deploy()
        self._wait_healthy(timeout_s)
        if self._state_file is not None:
            self._write_state(self._state_file)

    def _prepare(self) -> None:
        """Convert the model and profile the verifier's step curve here, once, saying so: otherwise
        every replica would do it at its first start, silently and at the same time."""
        import torch

        from specray.workers.engine.scheduling_policy import policy_class
        from specray.workers.verifier.deployment import load_step_curve, load_target

        config = self.config
        started = time.monotonic()
        self._say(f"model {config.model}: loading (the first start converts it into the cache, ~1 min) ...")
        target = load_target(config)
        self._say(f"model {config.model}: ready ({time.monotonic() - started:.1f} s)")
        if config.verifiers.num_gpus or not policy_class(config.scheduling).needs_step_curve:
            return  # a GPU verifier profiles its own device's curve; other schedulings need none
        started = time.monotonic()
        self._say("step curve: loading (the first start profiles the verifier's steps/s, ~15 s) ...")
        threads = torch.get_num_threads()
        torch.set_num_threads(config.verifiers.torch_threads)  # part of the curve's cache key
        try:
            load_step_curve(target, config)
        finally:
            torch.set_num_threads(threads)
        self._say(f"step curve: ready ({time.monotonic() - started:.1f} s)")

    def _deploy(self) -> None:
        """Serve and the application, from the Serve config a RayService gets (serveConfigV2):
        its proxy location and HTTP options, its application built by its import path and args."""
        deployment = serve_config(self.config)
        serve.start(proxy_location=deployment["proxy_location"], http_options=deployment["http_options"])
        [application] = deployment["applications"]
        module, builder = application["import_path"].split(":")
        serve.run(
            getattr(importlib.import_module(module), builder)(application["args"]),
            name=application["name"],
            route_prefix=application["route_prefix"],
            blocking=False,
        )

    def _init_ray(self) -> None:
        # Ray binds its own servers (GCS, raylet, workers, agents) to every interface unless the
        # node's address is loopback, and turns a loopback address (a node's, or that of a cluster
        # to join) into the machine's unless Ray clusters are disabled, as on macOS. A local cluster
        # is one node, and a cluster joined on loopback is one `specray cluster up` started on
        # 127.0.0.1: disable them. Ray reads the constant at each call (the variable reaches the
        # processes it starts).
        on_this_machine = self._ray_address is None or self._ray_address.rpartition(":")[0] in (
            LOOPBACK,
            "localhost",
        )
        if on_this_machine:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray_constants.ENABLE_RAY_CLUSTER = False
        # Token auth, which Ray turns on for a new local cluster, with the token in our run directory
        # rather than ~/.ray/auth_token; `specray cluster up` starts its nodes with that token and
        # token auth on, which a driver given an address must be told (for a remote cluster, its
        # operator sets RAY_AUTH_MODE and the token). Ray's notice that it turned token auth on
        # invites opting out: not shown.
        if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(ray_auth_token_file())
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if on_this_machine and self._ray_address is not None:
            enable_token_auth_by_default()  # unless RAY_AUTH_MODE says otherwise
        # Serve's components log to their files only: the console shows the replicas' own lines.
        os.environ["RAY_SERVE_LOG_TO_STDERR"] = "0"
        if not sys.stdout.isatty():  # a log file or a pipe: Ray's replica prefixes without colors
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        # Serve's driver-side notes ("Connecting to existing Serve app ... will not be applied",
        # printed by the second call that starts Serve here) say nothing an operator can act on.
        logging.getLogger("ray.serve").setLevel(
            logging.DEBUG if self.config.log_level == "debug" else logging.WARNING
        )
        # The replicas' stdout and stderr on the console: access log, warnings, tracebacks.
        if self._ray_address is not None:
            ray.init(
                address=self._ray_address, log_to_driver=self._stream_replica_output, configure_logging=False
            )
            return
        temp_dir = str(Path(self.config.ray_temp_dir).resolve()) if self.config.ray_temp_dir else None
        ray.init(
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            _temp_dir=temp_dir,
            log_to_driver=self._stream_replica_output,
            configure_logging=False,
        )

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._report_deployments()
            try:
                with urllib.request.urlopen(f"{self.http_url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the application was not healthy within {timeout_s:.0f} s")

    def _report_deployments(self) -> None:
        """Say how each deployment's replicas changed since the last call; raise if it failed."""
        application = serve.status().applications.get(APP_NAME)
        if application is None:
            return
        if application.status == "DEPLOY_FAILED":
            raise RuntimeError(f"the application failed to deploy: {application.message}")
        for name, deployment in application.deployments.items():
            states = ", ".join(
                f"{n} {_plain(s).lower()}" for s, n in sorted(deployment.replica_states.items()) if n
            )
            if states and self._replicas.get(name) != states:
                self._replicas[name] = states
                self._say(f"  {name}: {states}")

    def watch(self) -> None:
        """Call every second or so while serving (from the thread that started the cluster): restarts
        the embedded Redis if it died, reports replica changes, publishes Serve's view for
        `specray status`."""
        if self._redis is not None and (code := self._redis.exit_code()) is not None:
            self._say(f"Redis: the server exited (status {code}); restarting it on {self._redis.url} ...")
            try:
                self._redis.start()
            except RuntimeError as err:
                self._say(f"Redis: the restart failed, trying again in a moment: {err}")
            else:
                # Empty: the verifiers register again at their next heartbeat; streams in flight go on.
                self._say(f"Redis: restarted (pid {self._redis.pid}); sessions in flight continue")
        self._report_deployments()
        self._publish_serve_status()

    def _publish_serve_status(self) -> None:
        application = serve.status().applications.get(APP_NAME)
        if application is None or self.config.redis_url is None:
            return
        deployments = {
            name: {
                "status": _plain(d.status),
                "replicas": {_plain(s): n for s, n in d.replica_states.items()},
            }
            for name, d in application.deployments.items()
        }
        try:
            with redis.Redis.from_url(os.path.expandvars(self.config.redis_url), socket_timeout=2) as client:
                client.set(SERVE_STATUS_KEY, json.dumps(deployments), ex=_SERVE_STATUS_TTL_S)
        except redis.RedisError:
            pass  # Redis away for a moment: the next call publishes again

    def _write_state(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "http_url": self.http_url,
            "grpc_address": self.grpc_address,
            "redis_url": self.config.redis_url,
            "ray_session_dir": str(self.ray_session_dir),
        }
        # The Redis URL may hold a password: readable by this user only.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(state, file, indent=1)

    def stop(self) -> None:
        if self._state_file is not None:
            self._state_file.unlink(missing_ok=True)
        if self._connected_ray:
            try:
                # The application first, gracefully (replicas unregister from Redis), then Ray
                # with the Serve controller in it: `serve.shutdown()` would have the controller
                # kill itself mid-call, which Ray reports as a failed task it retries forever. A
                # joined cluster keeps running, with Serve (it may serve other applications).
                serve.delete(APP_NAME)
            except RayServeException:
                pass  # a start that failed before Serve was up: no application to delete
            finally:
                ray.shutdown()
                self._connected_ray = False
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _replicas(pool: Pool) -> str:
    if pool.autoscaling is not None:
        return f"{pool.autoscaling.min_replicas}-{pool.autoscaling.max_replicas}"
    return str(pool.num_replicas)


def _plain(state: object) -> str:
    # Serve's status names: enums, or their plain string values after a trip through the controller.
    return state.value if isinstance(state, Enum) else str(state)


def _dialable(host: str) -> str:
    # A wildcard bind is reached on loopback from this machine.
    return LOOPBACK if host in ("0.0.0.0", "::", "") else host
