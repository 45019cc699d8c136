"""A multi-node Ray cluster on this machine: `specray cluster up`, for tests and for trying specray
the way it runs on Kubernetes.

Each node is a Ray node of its own — a `ray start --block` process, in a session of its own, with
the raylet, Ray's agents and the workers under it — advertising its role's custom resource as the
Helm chart's worker groups do (cluster/runtime/node_roles.py), so the pools land on their nodes. All
of it listens on 127.0.0.1, runs no dashboard, and keeps its state under the run directory: each
node's Ray temp dir (sessions, sockets, logs), a HOME for the nodes, and a state file through which
another process (`specray cluster down`) finds the nodes again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from specray.cluster.app.node_processes import NodeLeader
from specray.cluster.app.ray_auth import ray_auth_token_file
from specray.cluster.app.redis_server import free_port
from specray.cluster.runtime.node_roles import NODE_ROLES
from specray.defaults import default_cache_dir, run_dir

LOOPBACK = "127.0.0.1"
STATE_FILE = "ray_nodes.json"
_STARTED = "Ray runtime started."  # what `ray start` prints once its node is up
_OBJECT_STORE_BYTES = 128 * 1024**2  # Serve passes little through it; Ray's default is 30% of memory
# The longest socket path Ray creates in a node's temp dir, past the temp dir itself:
# /session_<date>_<time>_<µs>_<pid>/sockets/plasma_store. Unix socket paths hold 107 bytes.
_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class RayNode:
    name: str  # head, draft-1, verifier-2, ...: also its Ray node name
    role: str
    pid: int  # its `ray start --block` process
    created: float  # that process's start time, which tells it apart from a later one with its pid
    temp_dir: str
    log: str  # `ray start`'s own output

    @property
    def leader(self) -> NodeLeader:
        return NodeLeader(self.pid, self.created)


class RayNodes:
    """`RayNodes().up(["head", "draft", "verifier", "verifier"])` starts them; `down()` stops them.

    `directory`: where each node's Ray temp dir goes (kept short: Ray's socket paths live under it);
    default: `nodes` in the run directory. `state_file`: where the running nodes are recorded;
    default: the run directory's, which `specray cluster` reads.
    """

    def __init__(self, directory: Path | None = None, state_file: Path | None = None) -> None:
        self.directory = (directory or run_dir() / "nodes").resolve()
        self.state_file = state_file or run_dir() / STATE_FILE
        self.address: str | None = None  # the head's GCS, host:port
        self.nodes: list[RayNode] = []
        self._started = 0  # nodes started so far, numbering their temp dirs
        self._per_role: dict[str, int] = {}  # nodes of each role started so far, numbering their names
        self._children: dict[int, subprocess.Popen] = {}  # the node processes this object started

    @classmethod
    def running(cls, state_file: Path | None = None) -> RayNodes | None:
        """The nodes a `specray cluster up` recorded, or None when none is recorded."""
        nodes = cls(state_file=state_file)
        if not nodes.state_file.is_file():
            return None
        state = json.loads(nodes.state_file.read_text())
        nodes.directory = Path(state["directory"])
        nodes.address = state["address"]
        nodes._started = state["started"]
        nodes._per_role = state["per_role"]
        nodes.nodes = [RayNode(**node) for node in state["nodes"]]
        return nodes

    def up(self, roles: list[str], num_cpus: int = 1, timeout_s: float = 120.0) -> RayNodes:
        """Start a head, then the other nodes joining it, one after the other (started at once,
        several nodes starve each other's start-up on a small machine, past Ray's 30 s limit)."""
        if not roles or roles[0] != "head" or "head" in roles[1:]:
            raise ValueError(f"the nodes must be one head first, then workers; got {','.join(roles)}")
        for role in roles:
            _check_role(role)
        self._temp_dir(len(roles))  # the longest path checked before any node starts
        running = RayNodes.running(self.state_file)
        if running is not None and running.alive():
            raise ValueError(
                f"a local Ray cluster is already up (head {running.address}): `specray cluster down` first"
            )
        try:
            for role in roles:
                self.add(role, num_cpus, timeout_s)
        except BaseException:
            self.down()
            raise
        return self

    def add(self, role: str, num_cpus: int = 1, timeout_s: float = 120.0) -> RayNode:
        """Start one node of `role` (the head starts the cluster; any other joins it)."""
        _check_role(role)
        head = role == "head"
        if head != (self.address is None):
            raise ValueError("the head comes first, and once" if head else "start a head first")
        temp_dir = self._temp_dir(self._started + 1)
        self._started += 1
        self._per_role[role] = self._per_role.get(role, 0) + 1
        name = role if head else f"{role}-{self._per_role[role]}"
        temp_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "specray.cluster.app.ray_node_start", "start", "--block",
            "--node-ip-address", LOOPBACK,
            "--temp-dir", str(temp_dir),
            "--node-name", name,
            "--num-cpus", str(num_cpus),
            "--resources", json.dumps(NODE_ROLES[role].node_resources),
            "--object-store-memory", str(_OBJECT_STORE_BYTES),
            # Every node runs these agents; on one machine each needs a port of its own.
            "--dashboard-agent-listen-port", str(free_port(LOOPBACK)),
            "--disable-usage-stats", "--log-style", "record", "--log-color", "false",
        ]  # fmt: skip
        if head:
            self.address = f"{LOOPBACK}:{free_port(LOOPBACK)}"
            command += [
                "--head", "--port", self.address.rsplit(":", 1)[1],
                "--include-dashboard=false",
                "--dashboard-port", str(free_port(LOOPBACK)),
                "--ray-client-server-port", str(free_port(LOOPBACK)),
            ]  # fmt: skip
        else:
            command += ["--address", self.address]
        log = temp_dir / "ray-start.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(),
                cwd=temp_dir,
                start_new_session=True,  # its own session: how its processes are found (NodeLeader)
            )
        node = RayNode(name, role, process.pid, NodeLeader.of(process.pid).created, str(temp_dir), str(log))
        self._children[process.pid] = process
        self.nodes.append(node)
        self._save()
        try:
            self._wait_started(node, process, timeout_s)
        except BaseException:
            self.kill(name)
            raise
        return node

    def _temp_dir(self, index: int) -> Path:
        """The Ray temp dir of the index-th node started."""
        temp_dir = self.directory / str(index)
        if len(str(temp_dir)) + _SOCKET_SUFFIX > _MAX_SOCKET_PATH:
            raise ValueError(
                f"{temp_dir} is too long for Ray's socket paths (at most"
                f" {_MAX_SOCKET_PATH - _SOCKET_SUFFIX} characters): give a shorter directory"
            )
        return temp_dir

    def _environment(self) -> dict[str, str]:
        environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        environment.update(
            HOME=str(self.directory / "home"),  # Ray and torch keep files under HOME
            # The nodes share one model cache, the one this process uses.
            SPECRAY_CACHE_DIR=os.environ.get("SPECRAY_CACHE_DIR") or str(default_cache_dir()),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(ray_auth_token_file()),
            RAY_USAGE_STATS_ENABLED="0",
            # Serve's own components (controller, proxy) log to their files only, as under
            # `specray serve`'s own cluster: a joined `specray serve` shows the replicas' lines.
            RAY_SERVE_LOG_TO_STDERR="0",
            # A node told to stop stops at once: draining it first, so that Serve moves its
            # replicas away, is for a node leaving a cluster that goes on, not for `down`.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # Multi-node clusters enabled, which `specray serve`'s single-node launcher disables
            # in its process (and so in a test process that ran it): ray_node_start keeps 127.0.0.1.
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        )
        (self.directory / "home").mkdir(parents=True, exist_ok=True)
        return environment

    def _wait_started(self, node: RayNode, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while _STARTED not in Path(node.log).read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with status {process.returncode}" if process.poll() is not None else "timed out"
                )
                raise RuntimeError(f"Ray node {node.name} did not start ({why}):\n{_tail(node.log)}")
            time.sleep(0.2)
        address = _raylet_address(node)
        if address != LOOPBACK:
            raise RuntimeError(f"Ray node {node.name} came up on {address}, not {LOOPBACK}: stopping it")

    def node(self, name: str) -> RayNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ValueError(f"no node {name!r}; the nodes: {', '.join(n.name for n in self.nodes)}")

    def alive(self) -> bool:
        return any(node.leader.processes() for node in self.nodes)

    def processes(self, name: str) -> list[psutil.Process]:
        """The live processes of node `name` (psutil.Process)."""
        return self.node(name).leader.processes()

    def kill(self, name: str) -> list[int]:
        """Node `name` lost: all its processes killed at once (see NodeLeader.kill). Returns their pids."""
        node = self.node(name)
        killed = node.leader.kill()
        self._reap(node)
        self.nodes.remove(node)
        self._save()
        return killed

    def down(self) -> None:
        """Stop every node (all at once: none outlives the cluster) and forget them."""
        for node in self.nodes:
            node.leader.terminate()
        for node in self.nodes:
            node.leader.stop()
            self._reap(node)
        self.nodes = []
        self.address = None
        self.state_file.unlink(missing_ok=True)

    def _reap(self, node: RayNode) -> None:
        child = self._children.pop(node.pid, None)
        if child is not None:
            child.wait(timeout=30)  # no zombie left behind in this process

    def _save(self) -> None:
        state = {
            "address": self.address,
            "directory": str(self.directory),
            "started": self._started,
            "per_role": self._per_role,
            "nodes": [asdict(node) for node in self.nodes],
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=1))


def _check_role(role: str) -> None:
    if role not in NODE_ROLES:
        raise ValueError(f"unknown node role {role!r}: one of {', '.join(NODE_ROLES)}")


def _raylet_address(node: RayNode) -> str | None:
    """The address the node's raylet was started on (its `--node_ip_address`)."""
    for process in node.leader.processes():
        arguments = process.cmdline()
        if arguments and arguments[0].endswith("/raylet"):
            for argument in arguments:
                if argument.startswith("--node_ip_address="):
                    return argument.split("=", 1)[1]
    return None


def _tail(path: str, lines: int = 30) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
