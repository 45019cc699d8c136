"""The batched throughput part of `specray bench engine`: N prompts at once, per batch size N.

Our engine runs the N prompts with `max_num_seqs=N` (continuous batching: the batch shrinks as
responses finish); Hugging Face `generate` runs the same N prompts as one left-padded batch. Each
reports output tokens/s and responses/s over the whole batch, prefill included, greedy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from specray.workers.engine.config import EngineConfig
from specray.workers.engine.drafter import Drafter
from specray.workers.engine.llm_engine import LLMEngine
from specray.workers.engine.sampling import SamplingParams
from specray.workers.models.loader import LoadedModel

# Run on a batch of prompts: (output ids per prompt, verify steps summed over the prompts).
BatchGenerate = Callable[[list[list[int]], int], tuple[list[list[int]], int]]


@dataclass
class ThroughputResult:
    name: str
    dtype: str
    batch_size: int
    tokens_per_s: float
    responses_per_s: float
    tau: float | None
    # Responses token for token equal to our autoregressive engine's at this batch size and dtype.
    matching_responses: int


@dataclass
class ThroughputMode:
    name: str
    generate: BatchGenerate
    speculative: bool


def engine_mode(
    target: LoadedModel,
    name: str,
    drafter_factory: Callable[[], Drafter] | None,
    num_speculative_tokens: int,
    cuda_graphs: bool = True,
) -> ThroughputMode:
    """Our engine with room for the whole batch at once: N sequences, each prompt's KV reserved."""
    gamma = num_speculative_tokens if drafter_factory else 0

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], int]:
        block = EngineConfig().block_size
        # Every sequence reserves its worst case up front (scheduler.py): prompt, output, γ+1.
        kv_tokens = sum(-(-(len(p) + max_tokens + gamma + 1) // block) * block for p in prompts)
        config = EngineConfig(
            num_speculative_tokens=gamma,
            max_num_seqs=len(prompts),
            max_num_batched_tokens=max(2048, len(prompts) * (gamma + 1)),
            kv_cache_tokens=kv_tokens,
            cuda_graphs=cuda_graphs,
        )
        engine = LLMEngine(target, drafter_factory() if drafter_factory else None, config)
        seqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens))
        return [s.output_ids for s in seqs], sum(s.stats.verify_steps for s in seqs)

    return ThroughputMode(name, generate, speculative=drafter_factory is not None)


def hf_mode(model, target: LoadedModel) -> ThroughputMode:  # noqa: ANN001 - a transformers model
    """`generate` on one left-padded batch; each response ends at its first stop token, as ours."""
    stops = set(target.stop_token_ids)
    pad = (
        target.tokenizer.pad_token_id
        if target.tokenizer.pad_token_id is not None
        else target.stop_token_ids[0]
    )
    device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], int]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=list(stops),
            pad_token_id=pad,
        )
        return [_until_stop(row, stops) for row in out[:, width:].tolist()], 0

    return ThroughputMode("hf_generate", generate, speculative=False)


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """A padded batch row up to and including its first stop token."""
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens) - 1)
    return tokens[: end + 1]


def measure(
    modes: list[ThroughputMode],
    dtype: str,
    prompt_ids: list[list[int]],
    batch_sizes: list[int],
    max_tokens: int,
    warmup_tokens: int,
) -> list[ThroughputResult]:
    """Each mode on the first N prompts (cycled), for each batch size N; modes interleaved per size
    so that drift in the machine's load hits them alike. A warm-up run of the same batch precedes
    each timed one (on a GPU it captures the CUDA graphs the timed run replays)."""
    results = []
    for size in tqdm(batch_sizes, desc=f"batch sizes ({dtype})"):
        prompts = [prompt_ids[i % len(prompt_ids)] for i in range(size)]
        outputs = {}
        for mode in modes:
            mode.generate(prompts, warmup_tokens)
            _sync()
            start = time.perf_counter()
            out, steps = mode.generate(prompts, max_tokens)
            _sync()
            elapsed = time.perf_counter() - start
            outputs[mode.name] = out
            tokens = sum(map(len, out))
            reference = outputs.get("autoregressive", out)
            results.append(
                ThroughputResult(
                    mode.name,
                    dtype,
                    size,
                    tokens / elapsed,
                    size / elapsed,
                    tokens / steps if mode.speculative and steps else None,
                    sum(a == b for a, b in zip(out, reference)),
                )
            )
    return results


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def print_table(results: list[ThroughputResult]) -> None:
    """Per batch size: each mode's rates, against HF generate at the same batch size and dtype and
    against the same mode at the smallest batch size measured."""
    hf = {(r.dtype, r.batch_size): r.tokens_per_s for r in results if r.name == "hf_generate"}
    smallest = {}
    for r in results:
        smallest.setdefault((r.name, r.dtype), r.tokens_per_s)
    print(
        f"{'mode':<22}{'dtype':>10}{'batch':>7}{'tokens/s':>11}{'resp/s':>9}{'vs HF':>8}"
        f"{'vs smallest batch':>19}{'tau':>7}  matches AR"
    )
    for r in results:
        vs_hf = (
            f"{r.tokens_per_s / hf[(r.dtype, r.batch_size)]:.2f}" if (r.dtype, r.batch_size) in hf else "-"
        )
        tau = f"{r.tau:.2f}" if r.tau is not None else "-"
        print(
            f"{r.name:<22}{r.dtype:>10}{r.batch_size:>7}{r.tokens_per_s:>11.1f}{r.responses_per_s:>9.2f}"
            f"{vs_hf:>8}{r.tokens_per_s / smallest[(r.name, r.dtype)]:>19.2f}{tau:>7}"
            f"  {r.matching_responses}/{r.batch_size}"
        )


def plot(axes, results: list[ThroughputResult]) -> None:  # noqa: ANN001 - two matplotlib axes
    """Output tokens/s and responses/s against batch size, one line per mode and dtype."""
    from matplotlib.ticker import NullLocator

    tokens_ax, responses_ax = axes
    lines = list(dict.fromkeys((r.name, r.dtype) for r in results))
    for i, (name, dtype) in enumerate(lines):
        rows = [r for r in results if (r.name, r.dtype) == (name, dtype)]
        style = dict(marker="o", color=f"C{i}", label=f"{name} ({dtype})")
        tokens_ax.plot([r.batch_size for r in rows], [r.tokens_per_s for r in rows], **style)
        responses_ax.plot([r.batch_size for r in rows], [r.responses_per_s for r in rows], **style)
    sizes = sorted({r.batch_size for r in results})
    for ax, label in ((tokens_ax, "output tokens/s"), (responses_ax, "responses/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("batch size (prompts at once)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    tokens_ax.set_title("throughput, greedy")
    responses_ax.legend(fontsize=7)
