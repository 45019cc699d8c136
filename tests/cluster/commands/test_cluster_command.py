"""`specray cluster` without starting Ray: the node list it refuses, and the commands that need a
recorded cluster saying so when there is none (exit status 2, a line naming what to do)."""

from __future__ import annotations

import pytest

from specray.cluster.app import ray_nodes
from specray.cluster.commands.cli import main


@pytest.fixture(autouse=True)
def no_recorded_cluster(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_nodes, "run_dir", lambda: tmp_path)


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ("draft,head", "one head first, then workers"),
        ("head,verifier,head", "one head first, then workers"),
        ("head,gpu", "unknown node role 'gpu'"),
    ],
)
def test_up_refuses_a_bad_node_list_before_starting_anything(capsys, tmp_path, nodes, message):
    assert main(["cluster", "up", "--nodes", nodes]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no node directory, no state file


def test_up_refuses_a_directory_too_long_for_ray_s_sockets(capsys, tmp_path):
    assert main(["cluster", "up", "--directory", str(tmp_path / ("d" * 80))]) == 2
    assert "too long for Ray's socket paths" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["status"], ["down"], ["kill-node", "verifier-1"], ["add-node", "draft"]])
def test_commands_on_a_cluster_say_when_none_is_recorded(capsys, argv):
    assert main(["cluster", *argv]) == 2
    assert "no local Ray cluster is recorded: start one with `specray cluster up`" in capsys.readouterr().err
