"""RouterMetrics on its own: the bookkeeping of one request's verify steps, without a cluster."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specray.router.errors import RequestError, Unavailable
from specray.router.metrics import RouterMetrics

MODEL = {"model_name": "m"}


def _value(metrics: RouterMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {**MODEL, **labels}) or 0.0


def test_steps_count_drafts_acceptance_and_latency():
    metrics = RouterMetrics("m", num_speculative_tokens=3)
    with metrics.request(num_prompt_tokens=7) as tracked:
        assert _value(metrics, "specray:num_requests_waiting") == 1
        tracked.step(num_tokens=1, num_draft_tokens=0, accepted=0)  # prefill: first token, no drafts
        assert _value(metrics, "specray:num_requests_waiting") == 0
        assert _value(metrics, "specray:num_requests_running") == 1
        tracked.step(num_tokens=3, num_draft_tokens=3, accepted=2)
        tracked.step(num_tokens=1, num_draft_tokens=2, accepted=0)
        tracked.finish("length")
    assert _value(metrics, "specray:num_requests_running") == 0
    assert _value(metrics, "specray:spec_decode_num_drafts_total") == 2
    assert _value(metrics, "specray:spec_decode_num_draft_tokens_total") == 5
    assert _value(metrics, "specray:spec_decode_num_accepted_tokens_total") == 2
    per_pos = [
        _value(metrics, "specray:spec_decode_num_accepted_tokens_per_pos_total", position=str(p))
        for p in range(3)
    ]
    assert per_pos == [1, 1, 0]
    assert _value(metrics, "specray:time_to_first_token_seconds_count") == 1
    assert _value(metrics, "specray:inter_token_latency_seconds_count") == 2
    assert _value(metrics, "specray:request_success_total", finish_reason="length") == 1
    assert _value(metrics, "specray:prompt_tokens_total") == 7
    assert _value(metrics, "specray:generation_tokens_total") == 5
    assert _value(metrics, "specray:e2e_request_latency_seconds_count") == 1


def test_failed_and_aborted_requests_are_counted_and_leave_the_gauges():
    metrics = RouterMetrics("m", num_speculative_tokens=1)
    with pytest.raises(Unavailable), metrics.request(3):
        raise Unavailable("no verifier")
    with pytest.raises(RequestError), metrics.request(3) as tracked:
        tracked.step(num_tokens=1, num_draft_tokens=0, accepted=0)
        raise RequestError("refused by the verifier")
    with pytest.raises(RuntimeError), metrics.request(3):
        raise RuntimeError("a bug")
    # The client went away mid-stream: the request's generator is closed at a yield.
    with pytest.raises(GeneratorExit), metrics.request(3) as tracked:
        tracked.step(num_tokens=1, num_draft_tokens=0, accepted=0)
        raise GeneratorExit
    assert _value(metrics, "specray:num_requests_waiting") == 0
    assert _value(metrics, "specray:num_requests_running") == 0
    assert _value(metrics, "specray:request_success_total", finish_reason="stop") == 0
    for reason in ("unavailable", "invalid", "error"):
        assert _value(metrics, "specray:request_failure_total", reason=reason) == 1
    assert _value(metrics, "specray:request_success_total", finish_reason="abort") == 1
    # Latency is observed for requests that ended on their own or by the client, not for failures.
    assert _value(metrics, "specray:e2e_request_latency_seconds_count") == 1
    assert _value(metrics, "specray:prompt_tokens_total") == 12


def test_exposition_parses_with_vllm_names_and_zeroed_series():
    families = {
        f.name: f for f in text_string_to_metric_families(RouterMetrics("m", 2).exposition().decode())
    }
    for name in (
        "specray:spec_decode_num_drafts",
        "specray:spec_decode_num_draft_tokens",
        "specray:spec_decode_num_accepted_tokens",
        "specray:spec_decode_num_accepted_tokens_per_pos",
        "specray:time_to_first_token_seconds",
        "specray:inter_token_latency_seconds",
        "specray:num_requests_running",
        "specray:num_requests_waiting",
        "specray:request_success",
        "specray:request_failure",
        "specray:prompt_tokens",
        "specray:generation_tokens",
        "specray:e2e_request_latency_seconds",
    ):
        assert name in families
    positions = {
        s.labels["position"] for s in families["specray:spec_decode_num_accepted_tokens_per_pos"].samples
    }
    assert positions == {"0", "1"}
