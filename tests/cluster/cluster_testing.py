"""What the cluster tests share: the in-process engine's greedy reference and the router's /health."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from specray.cluster.app.launcher import LocalCluster
from specray.workers.drafters.ngram import NgramDrafter
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.loader import LoadedModel


def engine_greedy(target: LoadedModel, prompts: list[str], max_tokens: int) -> list[tuple[str, list[int]]]:
    """Each user prompt's greedy text and token ids from the single-process engine (n-gram, γ = 5),
    what the cluster must reproduce."""
    engine = LLMEngine(target, NgramDrafter(), EngineConfig(num_speculative_tokens=5))
    ids = [engine.encode_prompt(messages=[{"role": "user", "content": p}]) for p in prompts]
    seqs = engine.generate(ids, SamplingParams(max_tokens=max_tokens))
    return [(engine.output_text(s), s.output_ids) for s in seqs]


def health(cluster: LocalCluster) -> tuple[int, dict]:
    """The router's /health: HTTP status and body (a 503 carries a body too)."""
    try:
        with urllib.request.urlopen(cluster.http_url + "/health", timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)
