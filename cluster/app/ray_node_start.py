"""`ray start` for the nodes of a local multi-node cluster: Ray's own command, on 127.0.0.1.

Ray's CLI swaps a loopback `--node-ip-address` (and the host of `--address`) for the machine's own
address, so that nodes on other machines can reach the node, unless multi-node clusters are
disabled; and with them disabled it refuses to start a node that joins a head. The nodes of
`specray cluster up` all live on this machine and must listen on loopback only, so this runs the
same command with that one swap left out: the addresses stay as given.

    python -m specray.cluster.app.ray_node_start start --block --node-ip-address 127.0.0.1 ...
"""

from __future__ import annotations

import sys

from ray._private import services
from ray.scripts.scripts import main


def _as_given(host: str) -> str:
    return host


if __name__ == "__main__":
    services.resolve_ip_for_localhost = _as_given
    sys.exit(main())
