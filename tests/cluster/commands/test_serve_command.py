"""`specray serve` as an operator runs it, in its own process with `make serve`'s environment (HOME and
TMPDIR inside the repository's .scratch): what its console says while starting, serving and
stopping; every listening socket of the cluster on loopback; `specray status`; its embedded Redis
killed and restarted; Ctrl-C leaving no process, no misleading line and no file outside .scratch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest

from specray.protos.specray.v1 import generate_pb2 as pb
from specray.protos.specray.v1 import generate_pb2_grpc

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
SCRATCH = REPO / ".scratch"
SPECRAY = str(Path(sys.executable).with_name("specray"))
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
# Lines an operator should never see: Ray's notes that mislead on a fresh local cluster.
MISLEADING = ("will not be applied", "graceful_shutdown", "infinite retries", "Token authentication")


class Served:
    """The `specray serve` process and its console, read line by line in the background."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lines: list[str] = []
        self._changed = threading.Condition()
        # Its own process group, as a shell gives a foreground job: Ctrl-C signals the whole group.
        self.process = subprocess.Popen(
            [
                SPECRAY,
                "serve",
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--ray-temp-dir",
                str(SCRATCH / "ray"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 120.0, after: int = 0) -> re.Match[str]:
        """The first console line from index `after` on that matches `pattern`."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if match := re.search(pattern, line):
                        return match
                remaining = deadline - time.monotonic()
                assert remaining > 0 and self.process.poll() is None, (pattern, self.lines[-30:])
                self._changed.wait(min(remaining, 1.0))

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]


@pytest.fixture(scope="module")
def served():
    home, tmp = SCRATCH / "serve-test-home", SCRATCH / "serve-test-tmp"
    for path in (home, tmp):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    # What `make serve` sets: HOME and TMPDIR in .scratch, the model cache in .scratch/cache.
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "SPECRAY_CACHE_DIR": str(SCRATCH / "cache")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    served = Served(env)
    try:
        served.url = served.wait_for(r"HTTP \(OpenAI\): (http://\S+)/v1", timeout_s=600).group(1)
        served.grpc_address = served.wait_for(r"gRPC: +(\S+)").group(1)
        served.wait_for("Ctrl-C stops it")
        yield served
    finally:
        if served.process.poll() is None:
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _chat(served: Served, body: dict) -> int:
    request = urllib.request.Request(
        served.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_first_start_says_what_it_does(served):
    for step in (
        r"model smollm2-135m: ready \(\d+\.\d s\)",
        r"step curve: ready",
        r"Redis: started on redis://127\.0\.0\.1:\d+/0",
        r"Ray: starting a local cluster on 127\.0\.0\.1",
        r"application: deploying router, 1 draft worker\(s\), 1 verifier\(s\)",
        r"Verifier: 1 running",
        r"specray is serving smollm2-135m",
        r"Ray logs: +\S+/logs",
    ):
        served.wait_for(step, timeout_s=1)


def test_every_listening_socket_is_on_loopback(served):
    wildcard: dict[int, list[int]] = {}
    listening = 0
    for process in served.tree():
        for connection in process.net_connections(kind="inet"):
            if connection.status != psutil.CONN_LISTEN:
                continue
            listening += 1
            if connection.laddr.ip not in LOOPBACK:
                assert "ServeReplica" in process.name(), (process.name(), connection.laddr)
                wildcard.setdefault(process.pid, []).append(connection.laddr.port)
    # Redis, the GCS, the raylet, Ray's agents, Serve's proxy, the router's gRPC API, the verifier.
    assert listening >= 10
    # Where Ray does not allow otherwise: each Serve replica's inter-deployment gRPC server, which
    # Ray Serve binds to [::]:0 itself (ray/serve/_private/replica.py), one per replica.
    assert len(wildcard) <= 3 and all(len(ports) == 1 for ports in wildcard.values()), wildcard


def test_each_request_gets_one_access_log_line(served):
    start = len(served.lines)
    assert _chat(served, {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}) == 200
    assert _chat(served, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}) == 400
    line = served.wait_for(
        r"POST /v1/chat/completions 200 (\d+) tokens τ \d\.\d\d (\d+\.\d{3}) s$", after=start
    )
    assert 1 <= int(line.group(1)) <= 8
    served.wait_for(r"POST /v1/chat/completions 400 \d+\.\d{3} s$", after=start)
    with grpc.insecure_channel(served.grpc_address) as channel:
        request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="Say hi.")], max_tokens=4)
        assert generate_pb2_grpc.GenerationStub(channel).Generate(request, timeout=300).text
    served.wait_for(
        r"gRPC /specray\.v1\.Generation/Generate OK \d+ tokens τ \d\.\d\d \d+\.\d{3} s$", after=start
    )
    assert not any("GET /health" in line for line in served.lines)  # probes stay off the console


def test_status_shows_pools_replicas_sessions_verifiers_and_redis(served):
    deadline = time.monotonic() + 30
    while True:  # the launcher publishes Serve's view every second or so
        result = subprocess.run(
            [SPECRAY, "status"], capture_output=True, text=True, env=served.env, cwd=REPO, timeout=60
        )
        if "deployments (Serve)" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert (
        f"router {served.url}" in out and "health:     ok (HTTP 200): 1 verifier(s), 1 draft worker(s)" in out
    )
    # The HTTP and the gRPC request; the 400 was refused before generating.
    assert re.search(r"2 finished \((length|stop) .*\), 0 failed", out), out
    assert re.search(r"sessions:   \d+ \(\d+ finished\)", out), out
    for deployment in ("Router", "DraftWorker", "Verifier"):
        assert re.search(rf"{deployment} +healthy +1 running", out), out
    # (Session counts come from reports up to a second old: the last request may still be closing.)
    assert re.search(
        r"verifier-\S+ +127\.0\.0\.1:\d+ +node [0-9a-f]{8}, \d+ session\(s\), registration expires", out
    ), out
    assert re.search(r"draft_workers +draft-\S+", out) and re.search(
        r"verifiers +verifier-\S+ .*KV cache", out
    )
    assert re.search(r"server: +Redis \d", out), out


def test_a_killed_redis_is_restarted_and_the_console_says_so(served):
    [redis_server] = [p for p in served.tree() if p.name().startswith("redis-server")]
    start = len(served.lines)
    redis_server.kill()
    served.wait_for(r"Redis: the server exited \(status -9\); restarting it", after=start, timeout_s=30)
    served.wait_for(r"Redis: restarted \(pid \d+\)", after=start, timeout_s=30)
    deadline = time.monotonic() + 30
    while _get(served.url + "/health")[0] != 200:  # the verifier registers again at its next beat
        assert time.monotonic() < deadline
        time.sleep(0.25)
    assert _chat(served, {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}) == 200


def test_ctrl_c_stops_everything_quietly_and_nothing_was_written_outside_scratch(served):
    tree = served.tree()
    os.killpg(served.process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    assert served.process.wait(timeout=180) == 0
    time.sleep(1)  # the reader thread takes the last lines
    assert served.lines[-1] == "stopped.", served.lines[-20:]
    assert not [line for line in served.lines if any(m in line for m in MISLEADING)]
    assert not [line for line in served.lines if "Traceback" in line], served.lines
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    # make's HOME and TMPDIR stayed empty of specray's, Ray's and Redis's files (Ray's token, the
    # Redis directory and the state file live in .scratch/run; the state file is gone).
    home_files = [p for p in Path(served.env["HOME"]).rglob("*")]
    tmp_files = [p for p in Path(served.env["TMPDIR"]).iterdir() if not p.name.startswith("torchinductor")]
    assert home_files == [] and tmp_files == []
    assert not (SCRATCH / "run" / "serve.json").exists()
