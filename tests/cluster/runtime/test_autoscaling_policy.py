"""The pools' autoscaling policies as Serve calls them: an AutoscalingContext in, a replica count out.

The replicas' reports are what `DraftWorkerStats.autoscaling()` and `VerifierStats.autoscaling()`
produce; Serve's averaging over the look-back window is left out (one report per replica).
"""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from specray.cluster.runtime.autoscaling_policy import DraftPoolPolicy, VerifierPoolPolicy
from specray.cluster.runtime.config import ClusterConfig
from specray.workers.worker_stats import DraftWorkerStats, VerifierStats


def _context(
    reports: list[dict[str, float]],
    target_ongoing_requests: float,
    handle_requests: float = 0.0,
    queued_requests: float = 0.0,
) -> AutoscalingContext:
    replicas = [f"replica-{i}" for i in range(len(reports))]
    metrics: dict[str, dict[str, float]] = {}
    for replica, report in zip(replicas, reports):
        for key, value in report.items():
            metrics.setdefault(key, {})[replica] = value
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="pool",
        app_name="specray",
        current_num_replicas=len(replicas),
        target_num_replicas=len(replicas),
        running_replicas=replicas,
        total_num_requests=handle_requests,
        total_queued_requests=queued_requests,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(
            min_replicas=1, max_replicas=8, target_ongoing_requests=target_ongoing_requests
        ),
    )


def _draft_report(sessions: int, drafted: int, accepted: int) -> dict[str, float]:
    stats = DraftWorkerStats(sessions=sessions)
    for _ in range(drafted):
        stats.record(1, 0)
    stats.accepted_tokens = accepted
    return stats.autoscaling()


def test_draft_pool_grows_with_sessions_only_while_drafts_are_accepted():
    policy = DraftPoolPolicy(min_acceptance_rate=0.5)
    busy_and_accepted = _context([_draft_report(6, 40, 30)], target_ongoing_requests=2)
    assert policy(busy_and_accepted)[0] == 3
    busy_but_rejected = _context([_draft_report(6, 40, 4)], target_ongoing_requests=2)
    wanted, state = policy(busy_but_rejected)
    assert wanted == 1 and state["held_by_acceptance"] and state["acceptance_rate"] == pytest.approx(0.1)
    # No drafts at all (drafter `none`, or only prefills so far) is no evidence that drafting pays.
    assert policy(_context([_draft_report(6, 0, 0)], target_ongoing_requests=2))[0] == 1
    # Requests still queued at the router's handle count as load too.
    assert policy(_context([_draft_report(1, 10, 9)], 2, handle_requests=8, queued_requests=7))[0] == 4


def test_draft_pool_shrinks_whatever_the_acceptance():
    policy = DraftPoolPolicy(min_acceptance_rate=0.5)
    idle = _context([_draft_report(0, 0, 0), _draft_report(1, 10, 1)], target_ongoing_requests=2)
    assert policy(idle)[0] == 1
    # The replicas' sessions decide, not a request count Serve still holds from the busy period.
    stale = _context([_draft_report(0, 0, 0), _draft_report(0, 0, 0)], 2, handle_requests=4)
    assert policy(stale)[0] <= 1, "idle, reporting draft workers held up by Serve's stale request count"


def test_draft_pool_without_reports_follows_serves_request_count():
    """Reports that miss the look-back window must not pin the pool at its size."""
    policy = DraftPoolPolicy(min_acceptance_rate=0.5)
    unreported = _context([{}, {}], target_ongoing_requests=2)
    assert policy(unreported)[0] <= 1, "two idle, unreported draft workers should shrink to one"
    # Busy by Serve's count but with no acceptance evidence: held where it is, not grown.
    assert policy(_context([{}, {}], 2, handle_requests=9))[0] == 2


def _verifier_report(sessions: int, batch_tokens: list[int], budget: int = 16) -> dict[str, float]:
    stats = VerifierStats(budget, sessions=sessions)
    for tokens in batch_tokens:
        stats.record_batch(1, tokens)
    return stats.autoscaling()


def test_verifier_pool_follows_budget_use_and_sessions():
    policy = VerifierPoolPolicy(target_budget_utilization=0.5)
    # Steps fill 12 of 16 budget tokens: 0.75 used against 0.5 wanted per replica.
    full = _context([_verifier_report(3, [12, 12, 12])], target_ongoing_requests=64)
    wanted, state = policy(full)
    assert wanted == 2 and state["budget_utilization"] == pytest.approx(0.75)
    # Many sessions with small steps: the sessions target decides.
    crowded = _context([_verifier_report(20, [4, 4])], target_ongoing_requests=8)
    assert policy(crowded)[0] == 3
    # Idle (no step since the last report) and near idle: down to one.
    quiet = _context([_verifier_report(0, []), _verifier_report(1, [2, 3])], target_ongoing_requests=8)
    assert policy(quiet)[0] == 1


def test_policies_hold_until_replicas_report_and_while_they_start():
    empty = _context([], target_ongoing_requests=2)
    assert DraftPoolPolicy()(empty) == (0, {})
    assert VerifierPoolPolicy()(empty) == (0, {})
    # A second verifier is starting: the first one's idle report must not cancel it.
    starting = _context([_verifier_report(0, [])], target_ongoing_requests=8)
    starting.target_num_replicas = 2
    assert VerifierPoolPolicy()(starting)[0] == 2
    starting_drafts = _context([_draft_report(0, 0, 0)], target_ongoing_requests=2)
    starting_drafts.target_num_replicas = 2
    assert DraftPoolPolicy()(starting_drafts)[0] == 2


def test_reports_are_deltas_between_calls():
    stats = VerifierStats(token_budget=10)
    stats.record_batch(2, 10)
    assert stats.autoscaling()["specray_budget_utilization"] == 1.0
    assert stats.autoscaling()["specray_budget_utilization"] == 0.0  # no step since
    drafts = DraftWorkerStats()
    drafts.record(5, 4)
    assert drafts.autoscaling()["specray_accepted_tokens"] == 4
    assert drafts.autoscaling()["specray_draft_tokens"] == 0
    # A prefill longer than the budget runs alone: it fills the budget, no more.
    stats.record_batch(1, 25)
    assert stats.autoscaling()["specray_budget_utilization"] == 1.0


def test_config_selects_each_pools_policy():
    config = ClusterConfig(
        draft_workers={"autoscaling": {"max_replicas": 2, "min_acceptance_rate": 0.4}},
        verifiers={"autoscaling": {"max_replicas": 2, "target_budget_utilization": 0.6}},
        router={"autoscaling": {"max_replicas": 2}},
    )
    draft = AutoscalingConfig(**config.draft_workers.deployment_options()["autoscaling_config"])
    assert draft.policy.policy_function.endswith(":DraftPoolPolicy")
    assert draft.policy.policy_kwargs == {"min_acceptance_rate": 0.4}
    verifier = AutoscalingConfig(**config.verifiers.deployment_options()["autoscaling_config"])
    assert verifier.policy.policy_kwargs == {"target_budget_utilization": 0.6}
    router = AutoscalingConfig(**config.router.deployment_options()["autoscaling_config"])
    assert router.policy.is_default_policy_function()
    with pytest.raises(ValueError):
        ClusterConfig(draft_workers={"autoscaling": {"target_budget_utilization": 0.5}})
