"""Ray Serve autoscaling policies for the draft-worker and verifier pools, on speculation signals.

Serve's default policy counts the requests its handles send a replica. That fits the draft pool
(one `generate` call per session) but not the verifiers, whose traffic arrives over gRPC where Serve
never sees it; and it ignores what makes speculative decoding pay off. Each pool has its own policy
(the pools scale independently), fed by the numbers every replica returns from
`record_autoscaling_stats` (averaged by Serve over `look_back_period_s`):

- draft workers: open sessions (queue depth) sized against `target_ongoing_requests`, but the pool
  only grows while the verifiers accept at least `min_acceptance_rate` of its draft tokens: drafts
  that are mostly rejected buy nothing, so more draft workers would only produce more of them.
- verifiers: open sessions against `target_ongoing_requests`, and the share of the per-step token
  budget (`max_num_batched_tokens`) their batches fill against `target_budget_utilization`; the
  larger of the two replica counts wins.

Serve applies `min_replicas`/`max_replicas`, the up/downscale delays and the scaling factors to what a
policy returns. Serve pickles this module by value into its controller: it imports nothing from
specray.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the replicas import the metric keys below without importing Serve
    from ray.serve.config import AutoscalingContext

# Keys of the dicts the replicas' `record_autoscaling_stats` return.
SESSIONS = "specray_sessions"  # sessions open on the replica
DRAFT_TOKENS = "specray_draft_tokens"  # draft tokens verified since the previous report
ACCEPTED_TOKENS = "specray_accepted_tokens"  # of which the verifier accepted
BUDGET_UTILIZATION = (
    "specray_budget_utilization"  # batch tokens / budget, mean over the steps since the previous report
)


def _settling(ctx: AutoscalingContext) -> bool:
    """Replicas are still starting: the pool's reports describe fewer replicas than it will have,
    and deciding now would take back a scale-up before it lands (a verifier loads a model first)."""
    return ctx.current_num_replicas < ctx.target_num_replicas


def _per_replica(ctx: AutoscalingContext, key: str) -> list[float]:
    """The running replicas' window means of one reported metric (replicas not reporting yet are left out)."""
    metrics = (ctx.aggregated_metrics or {}).get(key, {})
    running = set(ctx.running_replicas)
    return [value for replica, value in metrics.items() if replica in running]


class DraftPoolPolicy:
    def __init__(self, min_acceptance_rate: float = 0.2) -> None:
        self.min_acceptance_rate = min_acceptance_rate

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        sessions = _per_replica(ctx, SESSIONS)
        if _settling(ctx) or not (sessions or ctx.running_replicas):  # nothing to go on yet
            return ctx.target_num_replicas, {}
        # The replicas' open sessions plus the requests queued at the router's handle. Serve's total
        # request count only stands in when no running replica's report reached the controller in
        # the look-back window: it kept two idle draft workers at two for minutes in loaded suite runs
        # (it still counted requests the replicas had finished), where the sessions read zero.
        load = sum(sessions) + ctx.total_queued_requests if sessions else ctx.total_num_requests
        wanted = math.ceil(load / ctx.config.target_ongoing_requests)
        drafted = sum(_per_replica(ctx, DRAFT_TOKENS))
        acceptance = sum(_per_replica(ctx, ACCEPTED_TOKENS)) / drafted if drafted else None
        held = wanted > ctx.target_num_replicas and (
            acceptance is None or acceptance < self.min_acceptance_rate
        )
        if held:
            wanted = ctx.target_num_replicas
        return wanted, {"load": load, "acceptance_rate": acceptance, "held_by_acceptance": held}


class VerifierPoolPolicy:
    def __init__(self, target_budget_utilization: float = 0.7) -> None:
        self.target_budget_utilization = target_budget_utilization

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        sessions = _per_replica(ctx, SESSIONS)
        utilization = _per_replica(ctx, BUDGET_UTILIZATION)
        if not sessions or not utilization or _settling(ctx):
            return ctx.target_num_replicas, {}
        by_sessions = math.ceil(sum(sessions) / ctx.config.target_ongoing_requests)
        # Proportional: the replicas' summed budget use spread at the target utilization each.
        by_budget = math.ceil(sum(utilization) / self.target_budget_utilization)
        return max(by_sessions, by_budget), {
            "sessions": sum(sessions),
            "budget_utilization": sum(utilization) / len(utilization),
        }
