"""The engine core: one scheduler that owns the sequences, their KV reservation and each step's
token budget, and one commit path.

Both drivers use it: `LLMEngine` (drafts from an in-process drafter) and the verifier's
`VerifierCore` (drafts arriving as segments from draft workers). A step is schedule → run → commit,
as in nano-vllm; drafts are just more scheduled tokens, as in vLLM v1. The scheduler only knows how
many of a sequence's committed tokens are already computed (in the KV cache): its pending tokens
plus its drafts form its share of the batch, whatever its phase.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from specray.kernels import use_triton
from specray.workers.engine.config import EngineConfig
from specray.workers.engine.cuda_graphs import StaticStepConfig
from specray.workers.engine.drafter import DraftProposal
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.engine.request_limits import check_context, draft_limit
from specray.workers.engine.sampling import SamplingParams, TokenLogprob, token_logprobs
from specray.workers.engine.scheduling_policy import SchedulingPolicy, policy_class
from specray.workers.engine.sequence import Sequence, Status
from specray.workers.engine.step_curve import StepCurve
from specray.workers.engine.stopping import append_tokens
from specray.workers.engine.verification import Verdict, verify_drafts
from specray.workers.models.loader import LoadedModel

# Prompt logprobs run the LM head over this many positions at a time: a long prompt's [P, V] logits
# would otherwise take gigabytes.
PROMPT_LOGPROB_ROWS = 256


class KVExhausted(RuntimeError):
    """The KV cache cannot hold one more request's worst case right now."""


@dataclass
class ScheduledWork:
    """One sequence's share of a step."""

    seq: Sequence
    pending: list[int]  # committed tokens not yet in the KV cache (this step computes them)
    proposal: DraftProposal | None  # None: a prefill chunk that samples nothing
    draft_slots: int = 0  # batch tokens set aside for this sequence's drafts

    @property
    def scheduled(self) -> ScheduledSequence:
        drafts = self.proposal.tokens if self.proposal else []
        return ScheduledSequence(
            self.seq.seq_id, self.pending + drafts, 1 + len(drafts) if self.proposal else 0
        )

    @property
    def num_tokens(self) -> int:
        return len(self.scheduled.token_ids)


@dataclass
class Commit:
    """What one step did for one sequence."""

    seq: Sequence
    sampled: bool  # False for a prefill chunk: nothing verified, nothing emitted
    num_verified: int  # drafts the step verified
    num_accepted: int
    tokens: list[int]  # newly committed: accepted drafts + correction/bonus, cut at a stop
    feature_start: int  # position of the first computed token
    features: torch.Tensor | None  # target features [n, m·d] of the positions now in the KV cache
    # When the request asked: the target's logprobs of `tokens`, and of the prompt tokens this
    # step computed (prompt positions 1.., from the prefill).
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


def static_steps(target: LoadedModel, config: EngineConfig) -> StaticStepConfig | None:
    """CUDA graphs for decode (1 token per sequence) and verify (γ+1) steps, where the config
    allows them and the target runs on a GPU with the Triton attention kernel."""
    param = next(target.model.parameters())
    if not (config.cuda_graphs and param.is_cuda and use_triton(param)):
        return None
    return StaticStepConfig(
        query_lens=(1, config.num_speculative_tokens + 1),
        max_batch=min(config.max_num_seqs, config.max_captured_batch),
        capture=True,
    )


class Scheduler:
    def __init__(
        self,
        target: LoadedModel,
        config: EngineConfig,
        feature_layers: tuple[int, ...] = (),
        step_curve: StepCurve | None = None,
    ) -> None:
        self.target = target
        self.config = config
        self.runner = ModelRunner(
            target.model,
            config.kv_cache_tokens,
            config.block_size,
            feature_layers,
            static_steps(target, config),
        )
        self.policy: SchedulingPolicy = policy_class(config.scheduling)(
            step_curve or config.step_curve, config.confidence_prior
        )
        self.max_context = target.config.max_position_embeddings
        self.vocab_size = target.config.vocab_size
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self._reserved_blocks = 0
        self._to_free: list[str] = []  # released sequences, freed between steps (never under a forward)

    # ---- sequences ------------------------------------------------------------------------------
    def new_sequence(
        self,
        seq_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        output_ids: list[int] | None = None,
    ) -> Sequence:
        """A checked sequence with its own seeded random stream (`output_ids`: a resumed session's
        committed output, which counts against max_tokens)."""
        tokens = list(prompt_ids) + list(output_ids or ())
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in tokens):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        check_context(len(prompt_ids), params.max_tokens, self.max_context)
        return Sequence(seq_id, list(prompt_ids), params, params.generator(), list(output_ids or ()))

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; `admit` runs it once a sequence slot and its KV reservation are free."""
        if self._blocks_for(seq) > self.runner.kv.num_blocks:
            raise ValueError("the request does not fit in the KV cache even alone")
        self.waiting.append(seq)

    def admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            if not self._reserve(self.waiting[0]):
                break
            self._run(self.waiting.popleft())

    def open(self, seq: Sequence) -> None:
        """Run a sequence now (a verifier session), or raise KVExhausted."""
        if not self._reserve(seq):
            raise KVExhausted("the KV cache is full")
        self._run(seq)

    def release(self, seq_id: str, reason: str = "abort") -> Sequence | None:
        """Finish a sequence (if not yet finished) and give back its reservation; its KV pages are
        freed before the next step."""
        for seq in [s for s in self.waiting if s.seq_id == seq_id]:
            seq.finish(reason)
            self.waiting.remove(seq)
        seq = self.running.pop(seq_id, None)
        if seq is None:
            return None
        if not seq.finished:
            seq.finish(reason)
        self._reserved_blocks -= self._blocks_for(seq)
        self._to_free.append(seq_id)
        return seq

    def free_released(self) -> None:
        for seq_id in self._to_free:
            self.runner.free(seq_id)
        self._to_free.clear()

    @property
    def has_released(self) -> bool:
        """Whether released sequences still hold KV pages (freed at the next step)."""
        return bool(self._to_free)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_blocks_used(self) -> int:
        return self.runner.kv.num_blocks - self.runner.kv.num_free_blocks

    def draft_limit(self, seq: Sequence, budget: int | None = None) -> int:
        return draft_limit(
            self.config.num_speculative_tokens,
            seq.params.max_tokens,
            len(seq.output_ids),
            seq.num_tokens,
            self.max_context,
            budget,
        )

    def _blocks_for(self, seq: Sequence) -> int:
        # The request's worst case, reserved up front so a running sequence never runs out of KV.
        return self.runner.kv.blocks_needed(
            len(seq.prompt_ids) + seq.params.max_tokens + self.config.num_speculative_tokens + 1
        )

    def _reserve(self, seq: Sequence) -> bool:
        need = self._blocks_for(seq)
        if self._reserved_blocks + need > self.runner.kv.num_blocks:
            return False
        self._reserved_blocks += need
        return True

    def _run(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running[seq.seq_id] = seq

    # ---- the step -------------------------------------------------------------------------------
    def form_batch(
        self,
        seqs: Iterable[Sequence],
        draft_slots: Callable[[Sequence, int], int],
        chunked_prefill: bool,
    ) -> list[ScheduledWork]:
        """Take sequences in the given order while the step's token budget and sequence cap hold.

        Each brings its pending tokens plus `draft_slots(seq, budget_left)` tokens counted for its
        drafts. A sequence whose pending tokens exceed what is left is cut to a prefill chunk that
        samples nothing (`chunked_prefill`), or, as the step's first, runs whole.
        """
        budget = self.config.max_num_batched_tokens
        work: list[ScheduledWork] = []
        for seq in seqs:
            pending = seq.token_ids[seq.num_computed :]
            if budget <= 0 or len(work) >= self.config.max_num_seqs:
                break
            if len(pending) > budget and chunked_prefill:
                work.append(ScheduledWork(seq, pending[:budget], None))
                break
            slots = draft_slots(seq, budget - len(pending))
            if work and len(pending) + slots > budget:
                break
            work.append(ScheduledWork(seq, pending, DraftProposal(tokens=[]), slots))
            budget -= len(pending) + slots
        return work

    def apply_policy(self, work: list[ScheduledWork]) -> None:
        """Cut each sampling sequence's drafts to what the policy verifies this step. Every sampling
        sequence verifies its anchor; dropped tails are redrafted from the new committed position.
        The step's batch starts with every pending token (prefill chunks included)."""
        sampling = [w for w in work if w.proposal is not None]
        base = sum(len(w.pending) for w in work)
        budgets = self.policy.budgets(
            [len(w.proposal.tokens) for w in sampling],
            [w.proposal.confidence for w in sampling],
            base_tokens=base,
            max_tokens=max(self.config.max_num_batched_tokens, base),
        )
        for w, keep in zip(sampling, budgets):
            w.proposal = w.proposal.prefix(keep)

    def execute(
        self, work: list[ScheduledWork], on_forward_done: Callable[[], None] | None = None
    ) -> list[Commit]:
        """One target forward over the batch, lossless verification, and the commit: each sequence
        keeps the KV of its pending tokens and accepted drafts, and appends the emitted tokens
        under its stop conditions."""
        prompt_rows = {i: n for i, w in enumerate(work) if (n := self._prompt_logprob_rows(w))}
        out = self.runner.run([w.scheduled for w in work], return_final_hidden=bool(prompt_rows))
        if on_forward_done is not None:
            on_forward_done()
        sampling = [i for i, w in enumerate(work) if w.proposal is not None]
        verdicts: dict[int, Verdict] = {}
        if sampling:
            # Only sampling sequences ask for logits, so the batch's logits are theirs, in order.
            results = verify_drafts(
                [work[i].seq for i in sampling], [work[i].proposal for i in sampling], out.all_logits
            )
            verdicts = dict(zip(sampling, results))
        commits = []
        for i, w in enumerate(work):
            seq = w.seq
            start = seq.num_computed
            verdict = verdicts.get(i, Verdict(0, []))
            num_accepted = verdict.num_accepted
            prompt_logprobs = None
            if i in prompt_rows:
                prompt_logprobs = self._prompt_logprobs(seq, start, out.final_hidden[i][: prompt_rows[i]])
                seq.prompt_logprobs += prompt_logprobs
            seq.num_computed = start + len(w.pending) + num_accepted
            self.runner.rollback(seq.seq_id, seq.num_computed)
            features = out.features[i][: len(w.pending) + num_accepted] if out.features is not None else None
            num_verified = len(w.proposal.tokens) if w.proposal is not None else 0
            tokens: list[int] = []
            logprobs = None
            if w.proposal is not None:
                seq.stats.record(num_verified, num_accepted)
                if w.proposal.confidence is None and num_verified:
                    self.policy.record(num_verified, num_accepted)
                tokens = append_tokens(
                    seq, verdict.emitted, self.target.stop_token_ids, self.target.tokenizer, self.max_context
                )
                if verdict.logprobs is not None:
                    logprobs = verdict.logprobs[: len(tokens)]  # a stop may cut the emitted tokens
                    seq.output_logprobs += logprobs
            commits.append(
                Commit(
                    seq,
                    w.proposal is not None,
                    num_verified,
                    num_accepted,
                    tokens,
                    start,
                    features,
                    logprobs,
                    prompt_logprobs,
                )
            )
        return commits

    @staticmethod
    def _prompt_logprob_rows(w: ScheduledWork) -> int:
        """How many of the work's leading positions predict a prompt token whose logprob the
        request asked for (position p predicts token p+1)."""
        if w.seq.params.prompt_logprobs is None:
            return 0
        start = w.seq.num_computed
        return max(0, min(len(w.pending), len(w.seq.prompt_ids) - 1 - start))

    def _prompt_logprobs(self, seq: Sequence, start: int, hidden: torch.Tensor) -> list[TokenLogprob]:
        """The raw model's logprobs (no temperature, cut or penalty, as vLLM's prompt logprobs) of
        prompt tokens start+1.. from the final hidden states of positions start.."""
        targets = seq.prompt_ids[start + 1 : start + 1 + len(hidden)]
        result: list[TokenLogprob] = []
        with torch.inference_mode():
            for lo in range(0, len(targets), PROMPT_LOGPROB_ROWS):
                rows = hidden[lo : lo + PROMPT_LOGPROB_ROWS]
                logprobs = self.target.model.compute_logits(rows).float().log_softmax(dim=-1)
                result += token_logprobs(
                    logprobs, targets[lo : lo + PROMPT_LOGPROB_ROWS], seq.params.prompt_logprobs
                )
        return result
