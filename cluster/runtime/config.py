"""The cluster's configuration: one YAML file drives `specray serve`, `serve run` and the Helm chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from specray.cluster.runtime.failover_config import Failover
from specray.cluster.runtime.limits import RequestLimits
from specray.cluster.runtime.tls import InternalTls
from specray.cluster.runtime.tracing import TracingConfig
from specray.defaults import DEFAULT_MODEL, default_drafter

# Console detail of `specray serve` and the level of every role's `specray` loggers.
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS = get_args(LogLevel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Autoscaling(_Strict):
    """Ray Serve `autoscaling_config` for a pool; the router's scales on Serve's queue depth alone."""

    # The Serve policy function (import path) that decides; None: Serve's default (queue depth).
    policy: ClassVar[str | None] = None

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    # Serve's pacing (its defaults): how often replicas report, over which window, and how long a
    # decision must hold before replicas are added or removed.
    metrics_interval_s: float = Field(10.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    def serve_options(self) -> dict[str, Any]:
        options = self.model_dump(include=set(Autoscaling.model_fields))
        if self.policy is not None:
            kwargs = self.model_dump(exclude=set(Autoscaling.model_fields))
            options["policy"] = {"policy_function": self.policy, "policy_kwargs": kwargs}
        return options


class DraftAutoscaling(Autoscaling):
    """Queue depth (sessions per replica), held back when the verifiers reject most drafts: more
    draft workers only produce more rejected tokens (cluster/runtime/autoscaling_policy.py)."""

    policy: ClassVar[str | None] = "specray.cluster.runtime.autoscaling_policy:DraftPoolPolicy"
    min_acceptance_rate: float = Field(0.2, ge=0, le=1)


class VerifierAutoscaling(Autoscaling):
    """Sessions per replica (`target_ongoing_requests`; the gRPC traffic is invisible to Serve's own
    count) and the share of the per-step token budget the batches fill (cluster/runtime/autoscaling_policy.py)."""

    policy: ClassVar[str | None] = "specray.cluster.runtime.autoscaling_policy:VerifierPoolPolicy"
    target_budget_utilization: float = Field(0.7, gt=0)


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
            options["autoscaling_config"] = self.autoscaling.serve_options()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class DraftPool(Pool):
    autoscaling: DraftAutoscaling | None = None


class VerifierPool(Pool):
    autoscaling: VerifierAutoscaling | None = None
    kv_cache_tokens: int = Field(32768, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    host: str = "127.0.0.1"  # the internal gRPC server binds here
    # Ports tried in order for the internal gRPC server; [0, 0] lets the OS pick a free one.
    port_range: tuple[int, int] = (0, 0)


# Keys older configs used for γ, and the one that replaced them.
RENAMED_KEYS = {"gamma": "num_speculative_tokens", "max_drafts": "num_speculative_tokens"}


class ClusterConfig(_Strict):
    model: str = DEFAULT_MODEL
    # none | ngram | a bundled or trained drafter, hybrid:<it>; unset: `default_drafter(model)`.
    drafter: str
    num_speculative_tokens: int = Field(5, ge=0, le=32)
    # The engine's dtype: `auto` is bf16 on CUDA and on CPUs with AMX-BF16 or AVX-512 BF16, fp32 elsewhere.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # How many drafts each verify step takes: `confidence` (DSpark Algorithm 1 over the step curve
    # each verifier profiles at start-up, cached per model/dtype/device), `fixed` (all γ), `off`
    # (none: autoregressive decoding through the same cluster).
    scheduling: Literal["confidence", "fixed", "off"] = "confidence"
    # The survival per draft assumed for drafters without a confidence head (n-gram).
    confidence_prior: float = Field(0.6, ge=0, le=1)
    default_max_tokens: int = Field(256, ge=1)  # when a request gives none
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(9000, ge=0, le=65535)
    redis_url: str | None = None  # None: `specray serve` starts a local Redis
    session_ttl_s: int = Field(600, ge=1)  # a running session's record lives this long past its last step
    finished_ttl_s: int = Field(60, ge=1)  # a finished session's record, kept for affinity
    ray_temp_dir: str | None = None
    router: Pool = Pool()
    draft_workers: DraftPool = DraftPool()
    verifiers: VerifierPool = VerifierPool()
    tracing: TracingConfig = TracingConfig()
    # The key clients must send (`Authorization: Bearer <key>` on HTTP /v1/*, `authorization`
    # metadata on gRPC); None: $SPECRAY_API_KEY, and when that is unset too, no key. $VARS expand.
    api_key: str | None = None
    limits: RequestLimits = RequestLimits()
    failover: Failover = Failover()
    internal_tls: InternalTls | None = None  # draft worker → verifier gRPC over TLS; None: plaintext
    # The roles' logging: `info` adds one access-log line per request (router), `warning` only problems.
    log_level: LogLevel = "info"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old in RENAMED_KEYS.keys() & data.keys():
                raise ValueError(f"`{old}` is now `{RENAMED_KEYS[old]}`")
            if data.get("drafter") is None:
                data = {**data, "drafter": default_drafter(data.get("model", DEFAULT_MODEL))}
        return data

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping")
        return cls.model_validate(data)

    def with_overrides(self, **changes: Any) -> ClusterConfig:
        data = {**self.model_dump(), **{k: v for k, v in changes.items() if v is not None}}
        if changes.get("drafter") is None and self.drafter == default_drafter(self.model):
            del data["drafter"]  # the default drafter follows the model
        return self.model_validate(data)
