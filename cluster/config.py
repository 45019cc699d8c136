"""The cluster's configuration: one YAML file drives `specray serve`, `serve run` and the Helm chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from specray.workers.models.loader import DEFAULT_MODEL


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class Pool(_Strict):
    """A Serve deployment's replicas: a fixed count, or an autoscaling range when `autoscaling` is set."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(0.0, ge=0)  # Ray CPUs reserved per replica (0 packs replicas on small machines)
    num_gpus: float = Field(0.0, ge=0)  # Ray GPUs per replica: on a GPU node, Ray hands the replica a device
    # Ray custom resources per replica: on Kubernetes each pool's worker group advertises its own, so
    # the pool's replicas land on that group's nodes.
    resources: dict[str, float] = Field(default_factory=dict)
    torch_threads: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)

    def deployment_options(self) -> dict[str, Any]:
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor_options["num_gpus"] = self.num_gpus
        if self.resources:
            actor_options["resources"] = dict(self.resources)
        options: dict[str, Any] = {
            "ray_actor_options": actor_options,
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class VerifierPool(Pool):
    kv_cache_tokens: int = Field(32768, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    host: str = "127.0.0.1"  # the internal gRPC server binds here
    # Ports tried in order for the internal gRPC server; [0, 0] lets the OS pick a free one.
    port_range: tuple[int, int] = (0, 0)


class ClusterConfig(_Strict):
    model: str = DEFAULT_MODEL
    drafter: str = "ngram"  # none | ngram | a trained drafter's directory
    num_speculative_tokens: int = Field(5, ge=0, le=32)
    default_max_tokens: int = Field(256, ge=1)  # when a request gives none
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(9000, ge=0, le=65535)
    redis_url: str | None = None  # None: `specray serve` starts a local Redis
    session_ttl_s: int = Field(600, ge=1)  # a running session's record lives this long past its last step
    finished_ttl_s: int = Field(60, ge=1)  # a finished session's record, kept for affinity
    ray_temp_dir: str | None = None
    router: Pool = Pool()
    draft_workers: Pool = Pool()
    verifiers: VerifierPool = VerifierPool()

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping")
        return cls.model_validate(data)

    def with_overrides(self, **changes: Any) -> ClusterConfig:
        return self.model_validate(
            {**self.model_dump(), **{k: v for k, v in changes.items() if v is not None}}
        )
