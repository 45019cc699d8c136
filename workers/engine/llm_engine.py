"""The single-process engine: continuous batching with lossless speculative decoding.

A thin driver of the engine core (`scheduler.py`): `step()` is schedule → draft → run → commit, in
the manner of nano-vllm. Drafts come from an in-process drafter, proposed for every ready sequence
in one call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from specray.workers.engine.config import EngineConfig
from specray.workers.engine.drafter import Drafter, DraftRequest
from specray.workers.engine.host_memory import keep_freed_memory
from specray.workers.engine.sampling import SamplingParams
from specray.workers.engine.scheduler import Commit, ScheduledWork, Scheduler
from specray.workers.engine.scheduling_policy import policy_class
from specray.workers.engine.sequence import Sequence
from specray.workers.engine.step_curve import load_or_profile
from specray.workers.models.loader import LoadedModel


@dataclass
class StepOutput:
    seq_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


class LLMEngine:
    def __init__(
        self, target: LoadedModel, drafter: Drafter | None = None, config: EngineConfig | None = None
    ) -> None:
        keep_freed_memory()  # a step's large tensors (logits, sampling) reuse freed memory
        self.target = target
        self.tokenizer = target.tokenizer
        self.drafter = drafter
        self.config = config or EngineConfig()
        if self.config.max_num_batched_tokens < self.config.max_num_seqs * (
            self.config.num_speculative_tokens + 1
        ):
            raise ValueError("max_num_batched_tokens must hold every sequence's anchor and γ drafts")
        curve = self.config.step_curve
        policy = policy_class(self.config.scheduling)
        if policy.needs_step_curve and curve is None:
            # Profiling the full batch range would take long on CPU; past the table the curve
            # extrapolates at constant tokens/s.
            curve = load_or_profile(
                target.model, str(target.path), min(self.config.max_num_batched_tokens, 128)
            )
        self.scheduler = Scheduler(
            target, self.config, drafter.feature_layers if drafter else (), step_curve=curve
        )
        self.max_context = self.scheduler.max_context
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, seq_id: str | None = None
    ) -> Sequence:
        seq = self.scheduler.new_sequence(seq_id or f"seq-{next(self._ids)}", prompt_ids, params)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq_id: str) -> None:
        self._release(seq_id, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

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
        self.scheduler.free_released()
        self.scheduler.admit()
        work = self.scheduler.form_batch(
            list(self.scheduler.running.values()), self._draft_slots, chunked_prefill=True
        )
        if not work:
            return []
        self._draft(work)
        self.scheduler.apply_policy(work)
        commits = self.scheduler.execute(work)
        return self._postprocess(commits)

    def _draft_slots(self, seq: Sequence, budget: int) -> int:
        return self.scheduler.draft_limit(seq, budget) if self.drafter is not None else 0

    def _draft(self, work: list[ScheduledWork]) -> None:
        """One drafter call for every sequence that samples this step and has room for drafts."""
        requests = [
            (w, DraftRequest(w.seq.seq_id, w.seq.token_ids, w.draft_slots, w.seq.params, w.seq.generator))
            for w in work
            if w.proposal is not None and w.draft_slots > 0
        ]
        if not requests:
            return
        proposals = self.drafter.propose([r for _, r in requests])
        for (w, request), proposal in zip(requests, proposals):
            if len(proposal.tokens) > request.max_tokens:
                raise RuntimeError(
                    f"drafter {self.drafter.name} proposed more than {request.max_tokens} tokens"
                )
            w.proposal = proposal

    def _postprocess(self, commits: list[Commit]) -> list[StepOutput]:
        outputs = []
        for c in commits:
            if self.drafter is not None and c.features is not None:
                self.drafter.observe(c.seq.seq_id, c.features, c.feature_start)
            if c.sampled:
                outputs.append(StepOutput(c.seq.seq_id, c.tokens, c.seq.finished, c.seq.finish_reason))
            if c.seq.finished:
                self._release(c.seq.seq_id, c.seq.finish_reason)
        return outputs

    def _release(self, seq_id: str, reason: str) -> None:
        self.scheduler.release(seq_id, reason)
        self.scheduler.free_released()  # nothing runs concurrently here: free its KV pages now
        if self.drafter is not None:
            self.drafter.release(seq_id)
