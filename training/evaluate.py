"""`specray eval drafter`: acceptance of drafters through the engine's real speculative loop.

τ is the mean number of tokens committed per verify step, the bonus/correction token included;
acceptance by position k is the fraction of verify steps whose k-th draft was accepted. At T = 0
each drafter's output is also compared token for token with plain autoregressive decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from specray.training.prompt_sets import humaneval_prompts, jsonl_prompts
from specray.training.sharegpt import sharegpt_prompts
from specray.workers.drafters.checkpoint import resolve_drafter_path
from specray.workers.drafters.registry import HYBRID_PREFIX, build_drafter, trained_drafter_name
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.loader import LoadedModel, load_model


@dataclass(frozen=True)
class EvalConfig:
    drafters: tuple[str, ...]
    target: str = "smollm2-135m"
    dataset: str = "sharegpt-heldout"
    num_prompts: int = 16
    max_tokens: int = 96
    temperature: float = 0.0
    num_speculative_tokens: int = 7
    batch_size: int = 16
    seed: int = 0
    dtype: str = "auto"
    labels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.drafters:
            raise ValueError("give at least one drafter")
        if self.labels and len(self.labels) != len(self.drafters):
            raise ValueError("give one label per drafter, or none")
        if min(self.num_prompts, self.max_tokens, self.num_speculative_tokens, self.batch_size) < 1:
            raise ValueError("num_prompts, max_tokens, num_speculative_tokens and batch_size must be >= 1")


def load_prompts(dataset: str, limit: int) -> list:
    if dataset == "sharegpt-heldout":
        return [[{"role": "user", "content": p.text}] for p in sharegpt_prompts("heldout", limit)]
    if dataset == "humaneval":
        return humaneval_prompts(limit)
    if Path(dataset).is_file():
        return jsonl_prompts(dataset, limit)
    raise FileNotFoundError(f"unknown dataset {dataset!r}: sharegpt-heldout, humaneval or a JSONL file")


def default_label(spec: str) -> str:
    if spec == "ngram":
        return "ngram"
    if spec.startswith(HYBRID_PREFIX):
        return f"hybrid ({Path(resolve_drafter_path(trained_drafter_name(spec))).name})"
    config = json.loads((resolve_drafter_path(spec) / "config.json").read_text())
    return f"{config['kind']} ({Path(resolve_drafter_path(spec)).name})"


def evaluate(config: EvalConfig, target: LoadedModel | None = None) -> dict:
    target = target or load_model(config.target, config.dtype)
    engine_config = EngineConfig(
        num_speculative_tokens=config.num_speculative_tokens,
        max_num_seqs=config.batch_size,
        max_num_batched_tokens=max(2048, config.batch_size * (config.num_speculative_tokens + 1)),
    )
    plain = LLMEngine(target, None, engine_config)
    prompts = [
        plain.encode_prompt(messages=p) if isinstance(p, list) else plain.encode_prompt(prompt=p)
        for p in load_prompts(config.dataset, config.num_prompts)
    ]
    params = [
        SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed + i)
        for i in range(len(prompts))
    ]
    reference = None
    if config.temperature == 0.0:
        reference = [s.output_ids for s in plain.generate(prompts, params)]
    labels = config.labels or tuple(default_label(d) for d in config.drafters)
    results = []
    for spec, label in tqdm(list(zip(config.drafters, labels)), desc="eval drafters"):
        engine = LLMEngine(target, build_drafter(spec, target), engine_config)
        seqs = engine.generate(prompts, params)
        steps = sum(s.stats.verify_steps for s in seqs)
        accepted = sum(s.stats.accepted_tokens for s in seqs)
        by_position = [0] * config.num_speculative_tokens
        for s in seqs:
            for k, n in enumerate(s.stats.accepted_per_position[: config.num_speculative_tokens]):
                by_position[k] += n
        results.append(
            {
                "drafter": label,
                "tau": (accepted + steps) / steps if steps else 0.0,
                "accept_by_position": [n / steps if steps else 0.0 for n in by_position],
                "matches_autoregressive": (
                    None if reference is None else [s.output_ids for s in seqs] == reference
                ),
                "verify_steps": steps,
                "tokens": sum(len(s.output_ids) for s in seqs),
            }
        )
    return {
        "target": config.target,
        "dataset": config.dataset,
        "temperature": config.temperature,
        "num_prompts": len(prompts),
        "max_tokens": config.max_tokens,
        "num_speculative_tokens": config.num_speculative_tokens,
        "results": results,
    }


def plot_acceptance(report: dict, path: str | Path) -> None:
    """Acceptance by position, the drafters side by side, τ in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    results = report["results"]
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        xs = [k + 1 + (i - (len(results) - 1) / 2) * width for k in range(len(r["accept_by_position"]))]
        ax.bar(xs, r["accept_by_position"], width, label=f"{r['drafter']}  τ={r['tau']:.2f}")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("fraction of verify steps accepting draft k")
    ax.set_title(f"{report['target']} · {report['dataset']} · T={report['temperature']:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
