"""What one request of a benchmark's load saw: its tokens and when they came.

The cluster's streaming clients and the in-process engine reference record the same thing the same
way, so their figures compare: TTFT from sending the request to its first token, and a step that
delivers k tokens after a gap g counts k inter-token latencies of g/k.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    token_ids: list[int] = field(default_factory=list)
    ttft: float = 0.0
    latency: float = 0.0  # from sending the request to its last token
    itls: list[float] = field(default_factory=list)

    def arrived(self, tokens: list[int], elapsed: float) -> None:
        """`tokens` arrived `elapsed` seconds after the request was sent."""
        if not tokens:
            return
        if self.token_ids:
            gap = (elapsed - self.latency) / len(tokens)
            self.itls += [gap] * len(tokens)
        else:
            self.ttft = elapsed
        self.token_ids += tokens
        self.latency = elapsed
