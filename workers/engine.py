"""The single-process engine: continuous batching with lossless speculative decoding.

`step()` is flat, in the manner of nano-vllm: schedule → run → postprocess. The scheduler only knows
how many of a sequence's committed tokens are already computed (in the KV cache); a sequence's
pending tokens plus its drafts form its share of the batch, whatever its phase.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from specray.workers.confidence_scheduler import POLICIES, SchedulingPolicy, VerifyScheduler
from specray.workers.drafters.base import Drafter, DraftProposal, DraftRequest
from specray.workers.model_runner import ModelRunner, RunOutput, ScheduledSequence
from specray.workers.models.loader import LoadedModel
from specray.workers.sampling import SamplingParams
from specray.workers.sequence import Sequence, Status
from specray.workers.step_curve import StepCurve, load_or_profile
from specray.workers.stopping import append_tokens
from specray.workers.verification import verify_drafts


@dataclass(frozen=True)
class EngineConfig:
    num_speculative_tokens: int = 5  # γ: at most this many drafts verified per sequence per step
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int = 16384
    block_size: int = 16
    # How many drafts each sequence verifies: `fixed` all of them, `confidence` DSpark Algorithm 1
    # over the step curve (given, or profiled/cached at start-up), `off` none; drafts without
    # confidences (n-gram) count `confidence_prior` each.
    scheduling: SchedulingPolicy = "fixed"
    step_curve: StepCurve | None = None
    confidence_prior: float = 0.6

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if self.scheduling not in POLICIES or not 0.0 <= self.confidence_prior <= 1.0:
            raise ValueError(f"scheduling must be one of {POLICIES}, confidence_prior in [0, 1]")
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.kv_cache_tokens, self.block_size) < 1:
            raise ValueError(
                "max_num_seqs, max_num_batched_tokens, kv_cache_tokens and block_size must be >= 1"
            )
        if self.max_num_batched_tokens < self.max_num_seqs * (self.num_speculative_tokens + 1):
            raise ValueError("max_num_batched_tokens must hold every sequence's anchor and γ drafts")


@dataclass
class StepOutput:
    seq_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


@dataclass
class _Work:
    seq: Sequence
    pending: list[int]  # committed tokens not yet in the KV cache (this step computes them)
    proposal: DraftProposal | None  # None for a prefill chunk that samples nothing

    @property
    def scheduled(self) -> ScheduledSequence:
        drafts = self.proposal.tokens if self.proposal else []
        return ScheduledSequence(
            self.seq.seq_id, self.pending + drafts, 1 + len(drafts) if self.proposal else 0
        )


class LLMEngine:
    def __init__(
        self, target: LoadedModel, drafter: Drafter | None = None, config: EngineConfig | None = None
    ) -> None:
        self.target = target
        self.tokenizer = target.tokenizer
        self.drafter = drafter
        self.config = config or EngineConfig()
        self.runner = ModelRunner(
            target.model,
            self.config.kv_cache_tokens,
            self.config.block_size,
            drafter.feature_layers if drafter else (),
        )
        self.max_context = target.config.max_position_embeddings
        curve = self.config.step_curve
        if self.config.scheduling == "confidence" and curve is None:
            # Profiling the full batch range would take long on CPU; past the table the curve
            # extrapolates at constant tokens/s.
            curve = load_or_profile(
                target.model, str(target.path), min(self.config.max_num_batched_tokens, 128)
            )
        self.scheduler = VerifyScheduler(self.config.scheduling, curve, self.config.confidence_prior)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self._reserved_blocks = 0

    # ---- requests -------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, seq_id: str | None = None
    ) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.target.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_context} tokens"
            )
        if self._blocks_for(len(prompt_ids), params) > self.runner.kv.num_blocks:
            raise ValueError("the request does not fit in the KV cache even alone")
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, (1,))))
        seq = Sequence(seq_id or f"seq-{next(self._ids)}", list(prompt_ids), params, generator)
        self.waiting.append(seq)
        return seq

    def abort(self, seq_id: str) -> None:
        for seq in self.waiting + self.running:
            if seq.seq_id == seq_id:
                seq.finish("abort")
        self.waiting = [s for s in self.waiting if not s.finished]
        self._release_finished()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages through the tokenizer's chat template."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is not None:
            return list(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def output_text(self, seq: Sequence) -> str:
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        return text[: seq.stop_text_len] if seq.stop_text_len is not None else text

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Sequence]:
        """Run these prompts to completion (continuous batching) and return their sequences."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        while self.has_unfinished():
            self.step()
        return seqs

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        work = self._schedule()
        if not work:
            return []
        out = self.runner.run([w.scheduled for w in work])
        return self._postprocess(work, out)

    def _schedule(self) -> list[_Work]:
        self._admit()
        budget = self.config.max_num_batched_tokens
        work: list[_Work] = []
        draft_requests: list[tuple[_Work, DraftRequest]] = []
        for seq in self.running:
            pending = seq.token_ids[seq.num_computed :]
            if budget <= 0:
                break
            if len(pending) > budget:
                work.append(_Work(seq, pending[:budget], None))
                budget = 0
                continue
            item = _Work(seq, pending, DraftProposal(tokens=[]))
            work.append(item)
            budget -= len(pending)
            max_drafts = self._max_drafts(seq, budget)
            if self.drafter is not None and max_drafts > 0:
                draft_requests.append(
                    (item, DraftRequest(seq.seq_id, seq.token_ids, max_drafts, seq.params, seq.generator))
                )
                budget -= max_drafts
        if draft_requests:
            proposals = self.drafter.propose([r for _, r in draft_requests])
            for (item, request), proposal in zip(draft_requests, proposals):
                if len(proposal.tokens) > request.max_tokens:
                    raise RuntimeError(
                        f"drafter {self.drafter.name} proposed more than {request.max_tokens} tokens"
                    )
                item.proposal = proposal
        if self.config.scheduling != "fixed":
            self._truncate_to_budgets([w for w in work if w.proposal is not None], work)
        return work

    def _truncate_to_budgets(self, items: list[_Work], work: list[_Work]) -> None:
        # Every sampling sequence verifies its anchor; the scheduler decides how many drafts follow.
        # Dropped tails are simply redrafted from the new committed position next step. The step's
        # batch starts with every pending token (prefill chunks included), as the forward sees it.
        budgets = self.scheduler.budgets(
            [len(w.proposal.tokens) for w in items],
            [w.proposal.confidence for w in items],
            base_tokens=sum(len(w.pending) for w in work),
        )
        for w, keep in zip(items, budgets):
            w.proposal = w.proposal.prefix(keep)

    def _max_drafts(self, seq: Sequence, budget: int) -> int:
        # The step always emits one target token after the accepted drafts, so drafting past
        # max_tokens - 1 (or the context) could never be used.
        remaining = seq.params.max_tokens - len(seq.output_ids) - 1
        room = self.max_context - seq.num_tokens - 1
        return max(0, min(self.config.num_speculative_tokens, remaining, room, budget))

    def _postprocess(self, work: list[_Work], out: RunOutput) -> list[StepOutput]:
        sampling = [(i, w) for i, w in enumerate(work) if w.proposal is not None]
        accepted: dict[int, tuple[int, list[int]]] = {}
        if sampling:
            results = verify_drafts(
                [w.seq for _, w in sampling],
                [w.proposal for _, w in sampling],
                [out.logits[i] for i, _ in sampling],
            )
            accepted = {i: result for (i, _), result in zip(sampling, results)}
        results = []
        for i, w in enumerate(work):
            seq = w.seq
            start = seq.num_computed
            num_accepted, emitted = accepted.get(i, (0, []))
            seq.num_computed = start + len(w.pending) + num_accepted
            self.runner.rollback(seq.seq_id, seq.num_computed)
            if self.drafter is not None and out.features is not None:
                self.drafter.observe(seq.seq_id, out.features[i][: len(w.pending) + num_accepted], start)
            if w.proposal is None:
                continue
            seq.stats.record(len(w.proposal.tokens), num_accepted)
            new_tokens = append_tokens(
                seq, emitted, self.target.stop_token_ids, self.tokenizer, self.max_context
            )
            results.append(StepOutput(seq.seq_id, new_tokens, seq.finished, seq.finish_reason))
        self._release_finished()
        return results

    # ---- admission and release ------------------------------------------------------------------
    def _blocks_for(self, prompt_len: int, params: SamplingParams) -> int:
        # Reserve the whole request's worst case up front so a running sequence never runs out of KV.
        return self.runner.kv.blocks_needed(
            prompt_len + params.max_tokens + self.config.num_speculative_tokens + 1
        )

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            need = self._blocks_for(len(seq.prompt_ids), seq.params)
            if self._reserved_blocks + need > self.runner.kv.num_blocks:
                break
            self._reserved_blocks += need
            seq.status = Status.RUNNING
            self.running.append(self.waiting.pop(0))

    def _release_finished(self) -> None:
        for seq in [s for s in self.running if s.finished]:
            self._reserved_blocks -= self._blocks_for(len(seq.prompt_ids), seq.params)
            self.runner.free(seq.seq_id)
            if self.drafter is not None:
                self.drafter.release(seq.seq_id)
        self.running = [s for s in self.running if not s.finished]
