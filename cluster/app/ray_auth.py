"""The token Ray's token authentication uses for the clusters specray starts on this machine.

One file in the run directory (rather than Ray's ~/.ray/auth_token), created once, readable by this
user only: `specray serve`'s own cluster, the nodes of `specray cluster up` and any driver joining
them (`specray serve --ray-address`) all read it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from specray.defaults import run_dir


def ray_auth_token_file() -> Path:
    path = run_dir() / "ray_auth_token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
    return path
