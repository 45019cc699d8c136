"""The Serve config (`serve deploy`, a KubeRay RayService's `serveConfigV2`) for a cluster config.

Pure: no Ray is started or imported, so the Helm chart's tests can compare its rendered
`serveConfigV2` with this. The application's deployment options (replicas, autoscaling, resources)
are not repeated here: `app_builder` derives them from the same `args`, so there is one copy.
"""

from __future__ import annotations

from typing import Any

from specray.cluster.runtime.config import ClusterConfig

APP_NAME = "specray"
IMPORT_PATH = "specray.cluster.app.application:app_builder"


def serve_config(config: ClusterConfig) -> dict[str, Any]:
    """The multi-application Serve config that runs `config`'s cluster on an existing Ray cluster."""
    if config.redis_url is None:
        raise ValueError("a Serve config needs redis_url: no launcher starts a Redis for it")
    return {
        # Serve's HTTP proxy on the head only, where the router is and where the chart's Services
        # point; a proxy per node would also collide on its port when nodes share an address (the
        # nodes of `specray cluster up` all run on 127.0.0.1).
        "proxy_location": "HeadOnly",
        "http_options": {"host": config.host, "port": config.http_port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                # Only the keys the YAML gave: app_builder fills in the same defaults as `specray serve`.
                "args": config.model_dump(mode="json", exclude_unset=True),
            }
        ],
    }
