"""The kinds of Ray node a specray cluster runs on, and the custom resource each advertises.

On Kubernetes the Helm chart gives the head and each pool its own worker group; every pod of a group
starts Ray with `--resources` naming its role's resource, and each pool's replicas ask for one unit
of it, so they land on that group's nodes. `specray cluster up` starts local nodes with the same
resources. The chart's values and these agree (tests/helm checks them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeRole:
    name: str
    resource: str  # the Ray custom resource the node advertises
    per_node: int  # units per node: how many of the pool's replicas (one unit each) a node holds
    pool: str  # the ClusterConfig pool pinned to this resource

    def __post_init__(self) -> None:
        if self.per_node < 1:
            raise ValueError(f"node role {self.name}: per_node must be >= 1, got {self.per_node}")

    @property
    def node_resources(self) -> dict[str, float]:
        """`ray start --resources` for a node of this role."""
        return {self.resource: self.per_node}

    @property
    def replica_resources(self) -> dict[str, float]:
        """What one replica of the pool asks for (the pool's `resources`)."""
        return {self.resource: 1}


HEAD = NodeRole("head", "specray_head", 1000, "router")  # the router, Serve's controller and proxy
# Two draft workers per node: each runs its drafter on one torch thread, a draft node has 2 CPUs.
DRAFT = NodeRole("draft", "specray_draft", 2, "draft_workers")
# One verifier per node: a verifier uses its node's cores (or GPU) and memory for the target and its
# KV cache, and a new replica beyond that asks Ray's autoscaler for a new node.
VERIFIER = NodeRole("verifier", "specray_verifier", 1, "verifiers")
NODE_ROLES = {role.name: role for role in (HEAD, DRAFT, VERIFIER)}
