"""Sampling parameters, the target's sampling distribution (penalties, temperature, top-k, top-p)
and the log-probabilities reported for emitted tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # top alternatives per token, as vLLM's default max_logprobs
MAX_REPETITION_PENALTY = 10.0


class ParamError(ValueError):
    """A sampling parameter out of bounds; `param` names the field, so the APIs can report it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI's presence and frequency penalties (over the output tokens) and the CTRL/Hugging Face
    # repetition penalty (over prompt and output), as vLLM applies them: before the temperature.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Log-probabilities of each emitted token plus this many top alternatives (0: the token's own
    # only); None computes nothing. `prompt_logprobs`: the same for each prompt token after the first.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ParamError("max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ParamError("temperature", f"temperature must be in [0, 100], got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ParamError("top_k", f"top_k must be a non-negative integer, got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise ParamError("stop", "stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise ParamError(name, f"{name} must be in [-2, 2], got {value!r}")
        rp = self.repetition_penalty
        if not math.isfinite(rp) or not 0.0 < rp <= MAX_REPETITION_PENALTY:
            raise ParamError(
                "repetition_penalty",
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {rp!r}",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS
            ):
                raise ParamError(name, f"{name} must be in [0, {MAX_LOGPROBS}], got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def generator(self) -> torch.Generator:
        """The request's own random stream: seeded when the request gives a seed, so its output
        is the same alone, batched, drafted anywhere or resumed."""
        generator = torch.Generator()
        generator.manual_seed(self.seed if self.seed is not None else int(torch.randint(2**62, (1,))))
        return generator


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    drafts: Sequence[int] = (),
) -> torch.Tensor:
    """The penalized logits [N, V] of N consecutive positions, row j following `drafts[:j]`.

    Row j is only ever used when drafts[:j] are all accepted (acceptance takes a prefix), so its
    penalties count them as output: that keeps the verified distribution at every position exactly
    what autoregressive decoding with the same penalties would sample from.
    """
    if not params.has_penalties:
        return logits
    rows, vocab = logits.shape
    device = logits.device
    output = torch.tensor(list(output_ids), dtype=torch.long, device=device)
    counts = torch.bincount(output, minlength=vocab)[:vocab].expand(rows, vocab).clone()
    if rows > 1 and drafts:
        ahead = torch.tensor(list(drafts[: rows - 1]), dtype=torch.long, device=device)
        one_hot = torch.zeros(len(ahead), vocab, dtype=counts.dtype, device=device)
        one_hot[torch.arange(len(ahead), device=device), ahead] = 1
        counts[1 : len(ahead) + 1] += one_hot.cumsum(dim=0)
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        seen[:, torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        penalized = torch.where(
            logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
        )
        logits = torch.where(seen, penalized, logits)
    if params.frequency_penalty:
        logits = logits - params.frequency_penalty * counts
    if params.presence_penalty:
        logits = logits - params.presence_penalty * (counts > 0)
    return logits


def _processed_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits whose softmax is the sampling distribution: scaled by the temperature, tokens outside
    top-k / top-p at -inf. Greedy rows keep the plain logits (temperature 1, no cut), as in vLLM."""
    logits = logits.float()
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))
    return logits


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the target samples from at each row of `logits` [N, V] (already penalized).

    Greedy rows return the plain softmax: acceptance only reads its argmax.
    """
    return _processed_logits(logits, params).softmax(dim=-1)


def target_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log of `target_distribution`, computed in log space (tiny probabilities keep their value;
    tokens top-k / top-p cut are -inf). This is vLLM's `logprobs_mode="processed_logprobs"`."""
    return _processed_logits(logits, params).log_softmax(dim=-1)


def token_logprobs(logprobs: torch.Tensor, tokens: Sequence[int], num_top: int) -> list[TokenLogprob]:
    """The log-probability of `tokens[j]` in row j of `logprobs` [≥len(tokens), V], with the
    `num_top` best tokens of that row."""
    if not tokens:
        return []
    rows = logprobs[: len(tokens)]
    index = torch.tensor(list(tokens), dtype=torch.long, device=rows.device)
    chosen = rows.gather(-1, index.unsqueeze(-1)).squeeze(-1).tolist()
    if num_top:
        values, ids = rows.topk(min(num_top, rows.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops)]
