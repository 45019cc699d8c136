"""Sampling parameters, the target's sampling distribution (penalties, temperature, top-k, top-p)
and the log-probabilities reported for emitted tokens."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    return apply_batch_penalties(logits, [params], [prompt_ids], [output_ids], [drafts], [logits.shape[0]])


def apply_batch_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    drafts: Sequence[Sequence[int]],
    num_rows: Sequence[int],
) -> torch.Tensor:
    """`apply_penalties` for a batch in one pass: sequence i owns the next `num_rows[i]` rows of
    `logits` [R, V]. Returns `logits` itself when no sequence has a penalty; else a float copy
    whose rows of the penalized sequences are penalized (the others unchanged)."""
    chosen = [i for i, p in enumerate(params) if p.has_penalties]
    if not chosen:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    first_row = [0]
    for n in num_rows[:-1]:
        first_row.append(first_row[-1] + n)
    rows_each = torch.tensor([num_rows[i] for i in chosen], device=device)
    seq_of_row = torch.repeat_interleave(torch.arange(len(chosen), device=device), rows_each)
    first = torch.tensor([first_row[i] for i in chosen], device=device)
    # Row j of a sequence counts its output plus its first j drafts.
    row_in_seq = torch.arange(len(seq_of_row), device=device) - (rows_each.cumsum(0) - rows_each)[seq_of_row]
    counts = torch.zeros(len(chosen), vocab, device=device)
    _count_tokens(counts, [output_ids[i] for i in chosen])
    counts = counts[seq_of_row]
    ahead = [list(drafts[i][: num_rows[i] - 1]) for i in chosen]
    width = max(map(len, ahead))
    if width:
        padded = torch.tensor([a + [0] * (width - len(a)) for a in ahead], dtype=torch.long, device=device)
        known = torch.tensor([len(a) for a in ahead], device=device)[seq_of_row]
        before = torch.arange(width, device=device).unsqueeze(0) < torch.minimum(row_in_seq, known).unsqueeze(
            1
        )
        row, slot = before.nonzero(as_tuple=True)
        counts.index_put_((row, padded[seq_of_row[row], slot]), torch.ones(len(row), device=device), True)

    def per_row(name: str) -> torch.Tensor:
        values = torch.tensor([getattr(params[i], name) for i in chosen], dtype=torch.float32, device=device)
        return values[seq_of_row].unsqueeze(1)

    rows = logits[first[seq_of_row] + row_in_seq].float()
    if any(params[i].repetition_penalty != 1.0 for i in chosen):
        in_prompt = torch.zeros(len(chosen), vocab, device=device)
        _count_tokens(in_prompt, [prompt_ids[i] for i in chosen])
        seen = (counts > 0) | (in_prompt[seq_of_row] > 0)
        penalty = per_row("repetition_penalty")
        rows = torch.where(seen, torch.where(rows > 0, rows / penalty, rows * penalty), rows)
    if any(params[i].frequency_penalty for i in chosen):
        rows = rows - per_row("frequency_penalty") * counts
    if any(params[i].presence_penalty for i in chosen):
        rows = rows - per_row("presence_penalty") * (counts > 0)
    if len(seq_of_row) == logits.shape[0]:
        return rows
    out = logits.to(torch.float32, copy=True)
    out[first[seq_of_row] + row_in_seq] = rows
    return out


def _count_tokens(counts: torch.Tensor, token_lists: Sequence[Sequence[int]]) -> None:
    """Add, in row i of `counts` [N, V], one per occurrence of each token of `token_lists[i]`."""
    flat = [t for tokens in token_lists for t in tokens]
    if not flat:
        return
    device = counts.device
    lengths = torch.tensor([len(tokens) for tokens in token_lists], device=device)
    row = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    tokens = torch.tensor(flat, dtype=torch.long, device=device)
    counts.index_put_((row, tokens), torch.ones(len(flat), device=device), accumulate=True)


@dataclass(frozen=True)
class RowCut:
    """A top-k or top-p cut on some rows: `rows` their indices (None: every row), `values` [n, 1]
    each row's k or p, `largest` the largest of them (known on the host: no device sync)."""

    rows: torch.Tensor | None
    values: torch.Tensor
    largest: float


@dataclass(frozen=True)
class SamplingRows:
    """The sampling parameters of R logits rows as tensors, so that temperature, top-k and top-p
    apply to a whole batch at once (the rows of one request repeat its parameters)."""

    temperature: torch.Tensor  # [R, 1] float32; 1 on greedy rows, whose logits stay plain
    top_k: RowCut | None  # None: no row cuts by top-k
    top_p: RowCut | None

    @classmethod
    def of(
        cls, params: Sequence[SamplingParams], num_rows: Sequence[int], vocab: int, device: torch.device
    ) -> SamplingRows:
        """Rows of `params[i]` repeated `num_rows[i]` times. Greedy rows keep the plain logits
        (temperature 1, no cut), as in vLLM."""
        temperature, top_k, top_p = [], [], []
        for p, n in zip(params, num_rows):
            sampled = not p.greedy
            temperature += [p.temperature if sampled else 1.0] * n
            top_k += [p.top_k if sampled and 0 < p.top_k < vocab else 0] * n
            top_p += [p.top_p if sampled else 1.0] * n
        return cls(
            torch.tensor(temperature, dtype=torch.float32, device=device).unsqueeze(1),
            _row_cut(top_k, [k > 0 for k in top_k], torch.long, device),
            _row_cut(top_p, [p < 1.0 for p in top_p], torch.float32, device),
        )


def _row_cut(values: list, cuts: list[bool], dtype: torch.dtype, device: torch.device) -> RowCut | None:
    rows = [i for i, cut in enumerate(cuts) if cut]
    if not rows:
        return None
    chosen = [values[i] for i in rows]
    return RowCut(
        None if len(rows) == len(values) else torch.tensor(rows, device=device),
        torch.tensor(chosen, dtype=dtype, device=device).unsqueeze(1),
        max(chosen),
    )


def processed_logits(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Logits [R, V] whose softmax is each row's sampling distribution: scaled by the temperature,
    tokens outside top-k / top-p at -inf."""
    logits = logits.float() / rows.temperature
    if rows.top_k is not None:
        logits = _cut_rows(logits, rows.top_k, _top_k)
    if rows.top_p is not None:
        logits = _cut_rows(logits, rows.top_p, _top_p)
    return logits


def _cut_rows(
    logits: torch.Tensor, cut: RowCut, fn: Callable[[torch.Tensor, RowCut], torch.Tensor]
) -> torch.Tensor:
    if cut.rows is None:
        return fn(logits, cut)
    out = logits.clone()
    out[cut.rows] = fn(logits[cut.rows], cut)
    return out


def _top_k(logits: torch.Tensor, cut: RowCut) -> torch.Tensor:
    kth = logits.topk(int(cut.largest), dim=-1).values.gather(-1, cut.values - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


# On the CPU top-p first sorts each row's best tokens only: a nucleus that ends among them needs no
# full sort of the vocabulary (measured: 83 ms of a 256-row regeneration step for the full sort).
# A GPU sorts the whole rows (cheap there), without the host sync the check for ties would cost.
TOP_P_CANDIDATES = 128


def _top_p(logits: torch.Tensor, cut: RowCut) -> torch.Tensor:
    """Keep the smallest prefix of each row's tokens, by probability (ties by id), whose mass
    reaches top_p (the top token always stays). On the CPU, rows whose nucleus ends among their
    `TOP_P_CANDIDATES` best tokens sort only those: the same prefix, the same cumulative sums."""
    probs = logits.softmax(dim=-1)
    if probs.device.type != "cpu" or probs.shape[-1] <= TOP_P_CANDIDATES:
        return _top_p_full(logits, probs, cut.values)
    best, ids = probs.topk(TOP_P_CANDIDATES, dim=-1)
    by_id, perm = ids.sort(dim=-1)  # the full sort's tie order (stable, by id)
    sorted_probs, rank = best.gather(-1, perm).sort(dim=-1, descending=True, stable=True)
    order = by_id.gather(-1, rank)
    keep = sorted_probs.cumsum(dim=-1) - sorted_probs < cut.values
    # Where a kept candidate ties the least candidate, other tokens of that probability would
    # compete for its place: those rows take the full sort. Elsewhere the last candidate is
    # dropped, and with it every token outside (its mass before is no smaller).
    exact = ~(keep & (sorted_probs == best[:, -1:])).any(dim=-1)
    out = torch.full_like(logits, float("-inf"))
    out.scatter_(-1, order, logits.gather(-1, order).masked_fill(~keep, float("-inf")))
    if not bool(exact.all()):
        rows = (~exact).nonzero().squeeze(-1)
        out[rows] = _top_p_full(logits[rows], probs[rows], cut.values[rows])
    return out


def _top_p_full(logits: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the target samples from at each row of `logits` [N, V] (already penalized).

    Greedy rows return the plain softmax: acceptance only reads its argmax.
    """
    return processed_logits(
        logits, SamplingRows.of([params], [logits.shape[0]], logits.shape[-1], logits.device)
    ).softmax(dim=-1)


def target_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log of `target_distribution`, computed in log space (tiny probabilities keep their value;
    tokens top-k / top-p cut are -inf). This is vLLM's `logprobs_mode="processed_logprobs"`."""
    rows = SamplingRows.of([params], [logits.shape[0]], logits.shape[-1], logits.device)
    return processed_logits(logits, rows).log_softmax(dim=-1)


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
