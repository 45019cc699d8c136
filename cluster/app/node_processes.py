"""One local Ray node's processes, found and ended together.

A node is a `ray start --block` process started in a session of its own: the GCS (head), the raylet,
Ray's agents and every worker the raylet starts (the Serve replicas among them) descend from it and
stay in its session, even once re-parented. A node is recognised by that session and its leader's
start time, so a process is only ever signalled when it is one of the node's: nothing another
program started, not even after the leader's pid has been reused.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class NodeLeader:
    """The `ray start --block` process a node was started as: its pid and start time (psutil's)."""

    pid: int
    created: float

    @classmethod
    def of(cls, pid: int) -> NodeLeader:
        return cls(pid, psutil.Process(pid).create_time())

    def processes(self) -> list[psutil.Process]:
        """The node's live processes, the leader first if it is alive."""
        reused_at = None  # when another process took the leader's pid, if one did
        found: dict[int, psutil.Process] = {}
        try:
            leader = psutil.Process(self.pid)
            if leader.create_time() == self.created:
                found[leader.pid] = leader
                found.update((p.pid, p) for p in leader.children(recursive=True))
            else:
                reused_at = leader.create_time()
        except psutil.NoSuchProcess:
            pass
        for process in psutil.process_iter(["create_time"]):
            created = process.info["create_time"]
            if process.pid in found or created is None or created < self.created:
                continue
            if reused_at is not None and created >= reused_at:
                continue  # the session of the pid's new owner
            try:
                if os.getsid(process.pid) == self.pid:
                    found[process.pid] = process
            except ProcessLookupError:
                pass
        return [p for p in found.values() if _alive(p)]

    def kill(self, timeout_s: float = 30.0) -> list[int]:
        """Every process of the node at once, as when its machine is lost: each is stopped first (so
        none starts another or reacts to the others going), then all are killed. Returns the pids."""
        stopped: dict[int, psutil.Process] = {}
        while found := [p for p in self.processes() if p.pid not in stopped]:
            for process in found:
                try:
                    process.suspend()
                except psutil.NoSuchProcess:
                    continue
                stopped[process.pid] = process
        for process in stopped.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        _wait_gone(list(stopped.values()), timeout_s)
        return sorted(stopped)

    def terminate(self) -> None:
        """Ask for Ray's own shutdown of the node: SIGTERM to `ray start --block`, which ends the
        node's processes."""
        try:
            leader = psutil.Process(self.pid)
            if leader.create_time() == self.created:
                leader.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass

    def stop(self, timeout_s: float = 30.0) -> None:
        """`terminate()`, then a kill of whatever is left after `timeout_s`."""
        self.terminate()
        deadline = time.monotonic() + timeout_s
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.kill()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while alive := [p for p in processes if _alive(p)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes still alive after SIGKILL: {[p.pid for p in alive]}")
        time.sleep(0.05)
