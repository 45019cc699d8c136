"""The verifier's step curve SPS(B): target forward steps per second against batch tokens B.

Confidence scheduling trades expected accepted tokens against step speed, so it needs to know how
much slower a step gets per extra verified token. We measure that once per model, dtype and device
(a ragged batch of B tokens over a few fake sequences with cached context, fastest of a few repeats)
and keep it as a small lookup table, cached as JSON under the specray cache.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specray.kernels.cpu_linear import uses_packed_gemm
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.models.decoder import DecoderModel
from specray.workers.models.loader import cache_dir


@dataclass(frozen=True)
class StepCurve:
    batch_tokens: tuple[int, ...]  # strictly increasing
    steps_per_s: tuple[float, ...]  # measured at each batch_tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_tokens", tuple(int(b) for b in self.batch_tokens))
        object.__setattr__(self, "steps_per_s", tuple(float(s) for s in self.steps_per_s))
        if not self.batch_tokens or len(self.batch_tokens) != len(self.steps_per_s):
            raise ValueError("a step curve needs one steps/s value per batch size, at least one")
        if self.batch_tokens[0] < 1 or any(a >= b for a, b in zip(self.batch_tokens, self.batch_tokens[1:])):
            raise ValueError(f"batch sizes must be positive and strictly increasing: {self.batch_tokens}")
        if any(s <= 0 for s in self.steps_per_s):
            raise ValueError("steps per second must be positive")

    def sps(self, batch_tokens: float) -> float:
        """Steps/s at B tokens: linear between measured points, flat below the first one, and at
        constant tokens/s past the last one (a pessimistic guess: compute-bound from there on)."""
        xs, ys = self.batch_tokens, self.steps_per_s
        if batch_tokens <= xs[0]:
            return ys[0]
        if batch_tokens >= xs[-1]:
            return ys[-1] * xs[-1] / batch_tokens
        i = bisect.bisect_right(xs, batch_tokens)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (batch_tokens - x0) / (x1 - x0)

    def save(self, path: Path) -> None:
        # Write then rename: replicas starting together may profile at once, and none of them
        # should ever read another's half-written file.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> StepCurve:
        data = json.loads(path.read_text())
        return cls(tuple(data["batch_tokens"]), tuple(data["steps_per_s"]))


def default_batch_sizes(max_tokens_per_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including the maximum: dense where the curve bends most."""
    if max_tokens_per_batch < 1:
        raise ValueError("max_tokens_per_batch must be >= 1")
    sizes = [1 << i for i in range(max_tokens_per_batch.bit_length()) if 1 << i < max_tokens_per_batch]
    return sizes + [max_tokens_per_batch]


def profile_step_curve(
    model: DecoderModel,
    max_tokens_per_batch: int = 128,
    num_seqs: int = 4,
    context_tokens: int = 64,
    repeats: int = 3,
) -> StepCurve:
    """Time one forward over B ragged batch tokens (spread over up to `num_seqs` sequences that
    already hold `context_tokens` of KV, as verify steps do) for each default batch size."""
    if min(num_seqs, context_tokens, repeats) < 1:
        raise ValueError("num_seqs, context_tokens and repeats must be >= 1")
    sizes = default_batch_sizes(max_tokens_per_batch)
    runner = ModelRunner(model, kv_cache_tokens=num_seqs * (context_tokens + max_tokens_per_batch + 32))
    vocab = model.config.vocab_size
    seq_ids = [f"profile-{i}" for i in range(num_seqs)]
    generator = torch.Generator().manual_seed(0)
    runner.run(
        [
            ScheduledSequence(s, torch.randint(vocab, (context_tokens,), generator=generator).tolist(), 0)
            for s in seq_ids
        ]
    )
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    batches = []
    for size in sizes:
        n = min(num_seqs, size)
        counts = [size // n + (i < size % n) for i in range(n)]
        batches.append(
            [
                ScheduledSequence(s, torch.randint(vocab, (c,), generator=generator).tolist(), c)
                for s, c in zip(seq_ids, counts)
            ]
        )
    # Round-robin over the sizes, so a slow spell (another process on a shared machine) hits all of
    # them alike instead of bending the curve; the fastest repeat is the least disturbed one.
    best = [float("inf")] * len(sizes)
    for attempt in range(repeats + 1):  # the first round warms up every shape
        for i, batch in enumerate(batches):
            sync()
            start = time.perf_counter()
            runner.run(batch)
            sync()
            if attempt:
                best[i] = min(best[i], time.perf_counter() - start)
            for s in seq_ids:
                runner.rollback(s, context_tokens)
    rates = [1.0 / t for t in best]
    # A bigger batch is never faster; on a shared CPU timing noise can say otherwise, and a fake
    # speed-up would make the scheduler verify tokens for nothing. Keep the curve non-increasing.
    rates = [min(rates[: i + 1]) for i in range(len(rates))]
    return StepCurve(tuple(sizes), tuple(rates))


def curve_cache_path(model_name: str, dtype: torch.dtype, device: str | torch.device) -> Path:
    """One curve per model, dtype and device; on CPU also per torch thread count (a verifier with
    one thread bends its curve differently from a profile taken with all cores) and per GEMM
    kernel (our packed bf16 GEMM or oneDNN's, `kernels/cpu_linear.py`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_name)).strip("_")
    kind = torch.device(device).type
    threads = f"-t{torch.get_num_threads()}" if kind == "cpu" else ""
    if uses_packed_gemm(dtype, torch.device(device)):
        threads += "-packed"
    return cache_dir() / "step_curves" / f"{safe}-{str(dtype).removeprefix('torch.')}-{kind}{threads}.json"


def load_or_profile(
    model: DecoderModel, model_name: str, max_tokens_per_batch: int = 128, refresh: bool = False
) -> StepCurve:
    """The cached curve for this model, dtype and device if it covers the range; else profile it."""
    param = next(model.parameters())
    path = curve_cache_path(model_name, param.dtype, param.device)
    if path.exists() and not refresh:
        curve = StepCurve.load(path)
        if curve.batch_tokens[-1] >= max_tokens_per_batch:
            return curve
    curve = profile_step_curve(model, max_tokens_per_batch)
    curve.save(path)
    return curve
