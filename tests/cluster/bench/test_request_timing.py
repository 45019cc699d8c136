"""How a benchmark's clients time a request: TTFT at the first tokens, then k latencies of g/k for
k tokens arriving after a gap g."""

from __future__ import annotations

import pytest

from specray.cluster.bench.request_timing import RequestTiming


def test_tokens_arriving_together_share_their_gap():
    timing = RequestTiming()
    timing.arrived([], 0.1)  # a message without tokens (e.g. a final one) changes nothing
    timing.arrived([7], 0.3)
    timing.arrived([8, 9, 10], 0.9)
    timing.arrived([11], 1.0)
    assert timing.token_ids == [7, 8, 9, 10, 11]
    assert timing.ttft == 0.3 and timing.latency == 1.0
    assert timing.itls == pytest.approx([0.2, 0.2, 0.2, 0.1])
