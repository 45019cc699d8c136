"""The Serve application: Router (ingress) → DraftWorker pool → (gRPC) → Verifier pool.

`serve run specray.cluster.app.application:app_builder config=cluster.yaml` (or the same import path in a
`serve deploy` config) builds it from the YAML on an existing Ray cluster; the YAML must then give a
`redis_url`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from specray.cluster.runtime.config import ClusterConfig
from specray.router.router import Router
from specray.workers.draft_worker.deployment import DraftWorker
from specray.workers.verifier.deployment import Verifier


def build_app(config: ClusterConfig) -> Application:
    if config.redis_url is None:
        raise ValueError("the application needs redis_url (specray serve starts a local Redis)")
    verifiers = Verifier.options(**config.verifiers.deployment_options()).bind(config)
    draft_workers = DraftWorker.options(**config.draft_workers.deployment_options()).bind(config)
    return Router.options(**config.router.deployment_options()).bind(config, draft_workers, verifiers)


def app_builder(args: dict[str, Any]) -> Application:
    config = ClusterConfig.from_yaml(args["config"]) if "config" in args else ClusterConfig()
    overrides = {k: v for k, v in args.items() if k != "config"}
    return build_app(config.with_overrides(**overrides))
