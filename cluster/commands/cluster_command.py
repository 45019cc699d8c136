"""`specray cluster up|status|kill-node|add-node|down`: a multi-node Ray cluster on this machine.

Separate Ray nodes (a head, draft nodes, verifier nodes) advertising the custom resources the Helm
chart's worker groups advertise, all on 127.0.0.1, for trying the cluster as it runs on Kubernetes:
`specray serve --ray-address` deploys on it, each pool on its own nodes, and `kill-node` shows what a
lost node does. The nodes keep running after the command returns, until `specray cluster down`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specray.cluster.commands.cli import HelpFormatter
from specray.cluster.runtime.node_roles import NODE_ROLES
from specray.defaults import checkout_root

DEFAULT_NODES = "head,draft,verifier,verifier"


def register(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    roles = " | ".join(f"{r.name} ({json.dumps(r.node_resources)})" for r in NODE_ROLES.values())

    up = actions.add_parser(
        "up", formatter_class=HelpFormatter, help="start the nodes: a head, then the others joining it"
    )
    up.add_argument(
        "--nodes", default=DEFAULT_NODES, help=f"node roles, comma-separated, the head first: {roles}"
    )
    up.add_argument(
        "--num-cpus", type=int, default=1, help="Ray CPUs per node (specray's pools reserve none by default)"
    )
    up.add_argument(
        "--directory",
        type=Path,
        help="where the nodes' Ray temp dirs go; short, as Ray's socket paths live there"
        " (default: nodes/ in the run directory)",
    )
    up.set_defaults(func=run_up)

    status = actions.add_parser("status", formatter_class=HelpFormatter, help="the nodes and their processes")
    status.set_defaults(func=run_status)

    kill = actions.add_parser(
        "kill-node",
        formatter_class=HelpFormatter,
        help="kill every process of one node at once, as when its machine is lost",
    )
    kill.add_argument("name", help="the node, as `specray cluster status` names it (e.g. verifier-1)")
    kill.set_defaults(func=run_kill_node)

    add = actions.add_parser(
        "add-node", formatter_class=HelpFormatter, help="start one more node, joining the running head"
    )
    add.add_argument("role", choices=[r for r in NODE_ROLES if r != "head"])
    add.add_argument("--num-cpus", type=int, default=1)
    add.set_defaults(func=run_add_node)

    down = actions.add_parser("down", formatter_class=HelpFormatter, help="stop every node")
    down.set_defaults(func=run_down)


def _running():
    from specray.cluster.app.ray_nodes import RayNodes

    nodes = RayNodes.running()
    if nodes is None:
        raise FileNotFoundError("no local Ray cluster is recorded: start one with `specray cluster up`")
    return nodes


def _describe(nodes) -> list[str]:
    lines = [f"Ray head (GCS): {nodes.address}"]
    for node in nodes.nodes:
        alive = len(node.leader.processes())
        lines.append(
            f"  {node.name:<12} pid {node.pid:<8} {json.dumps(NODE_ROLES[node.role].node_resources):<26}"
            f" {alive} process(es)  logs {node.temp_dir}/session_latest/logs"
        )
    return lines


def run_up(args: argparse.Namespace) -> int:
    from specray.cluster.app.ray_nodes import RayNodes

    roles = [role.strip() for role in args.nodes.split(",") if role.strip()]
    print(f"specray cluster: starting {len(roles)} Ray node(s) on 127.0.0.1 ...", flush=True)
    try:
        nodes = RayNodes(directory=args.directory).up(roles, num_cpus=args.num_cpus)
    except RuntimeError as err:  # a node did not come up (its output is in the message); none is left
        print(f"specray cluster up: {err}", flush=True)
        return 1
    config = "cluster/multinode.yaml" if checkout_root() is not None else "<your cluster YAML>"
    print(
        "\n".join(_describe(nodes)) + f"\nDeploy specray on it (each pool on its nodes):\n"
        f"  specray serve --ray-address {nodes.address} --config {config}\n"
        "`specray cluster down` stops the nodes.",
        flush=True,
    )
    return 0


def run_status(args: argparse.Namespace) -> int:
    nodes = _running()
    print("\n".join(_describe(nodes)))
    return 0 if all(node.leader.processes() for node in nodes.nodes) else 1


def run_kill_node(args: argparse.Namespace) -> int:
    nodes = _running()
    killed = nodes.kill(args.name)
    print(f"node {args.name}: killed {len(killed)} process(es): {' '.join(map(str, killed))}")
    return 0


def run_add_node(args: argparse.Namespace) -> int:
    nodes = _running()
    node = nodes.add(args.role, num_cpus=args.num_cpus)
    print(f"node {node.name}: joined {nodes.address} (pid {node.pid})")
    return 0


def run_down(args: argparse.Namespace) -> int:
    nodes = _running()
    count = len(nodes.nodes)
    nodes.down()
    print(f"stopped {count} node(s).")
    return 0
