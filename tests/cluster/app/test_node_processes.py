"""A local Ray node's processes as `NodeLeader` finds and ends them, on a stand-in process tree: a
leader in its own session with a child and an orphan (its parent gone, re-parented out of the tree
but still in the session). Found: exactly those; killed: all at once, and nothing else."""

from __future__ import annotations

import subprocess
import time

import psutil

from specray.cluster.app.node_processes import NodeLeader

# The leader runs `sleep` as its own image; one child stays its child, one sleeps on as an orphan.
NODE = "sleep 300 & (sleep 300 &); exec sleep 300"


def _start_node() -> tuple[subprocess.Popen, NodeLeader]:
    leader = subprocess.Popen(["bash", "-c", NODE], start_new_session=True)
    node = NodeLeader.of(leader.pid)
    deadline = time.monotonic() + 10
    while len(node.processes()) < 3:
        assert time.monotonic() < deadline, [p.cmdline() for p in node.processes()]
        time.sleep(0.05)
    return leader, node


def test_finds_the_session_s_processes_orphans_included_and_kills_them_all_and_nothing_else():
    outsider = subprocess.Popen(["sleep", "300"])  # started by the same parent, not of the node
    leader, node = _start_node()
    try:
        found = node.processes()
        assert len(found) == 3 and found[0].pid == leader.pid
        assert outsider.pid not in {p.pid for p in found}
        orphans = [p for p in found[1:] if p.ppid() != leader.pid]
        assert len(orphans) == 1, "the stand-in should have one process outside the leader's tree"
        killed = node.kill()
        assert killed == sorted(p.pid for p in found)
        assert leader.wait(timeout=10) == -9
        assert node.processes() == [] and outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_stop_asks_the_leader_then_kills_what_stays():
    leader, node = _start_node()
    survivors = [p for p in node.processes() if p.pid != leader.pid]
    node.stop(timeout_s=1)  # SIGTERM reaches the leader only: its two sleeps outlive it until killed
    assert leader.wait(timeout=10) == -15
    assert not [p for p in survivors if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_leader_pid_taken_by_another_process_is_not_the_node():
    leader, node = _start_node()
    node.kill()
    leader.wait()
    impostor = NodeLeader(leader.pid, node.created - 1000)  # recorded long before: not this process
    assert impostor.processes() == []
