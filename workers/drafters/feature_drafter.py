"""What the trained drafters share on the engine side: a model bound to its frozen target, the
target features each sequence has delivered so far (kept per sequence, dropped on release), and
the output head: the target's LM head rows of the tokens the drafter may propose.

The drafter computes in bf16 under a bf16 target and in fp32 otherwise: at batch 1 a proposal is a
chain of small matmuls whose time is the weights' bytes. Draft distributions are still formed in
fp32 from the logits (the block sampler), so the p_d verification divides by is the exact
probability each token was drawn with, whatever the backbone's precision.
"""

from __future__ import annotations

import torch

from specray.kernels.cpu_linear import uses_packed_gemm
from specray.workers.drafters.context_cache import ContextCache
from specray.workers.drafters.layers import FeatureDrafterBackbone
from specray.workers.engine.drafter import Drafter, DraftRequest
from specray.workers.models.decoder import DecoderModel


class FeatureDrafter(Drafter):
    def __init__(self, model: FeatureDrafterBackbone, target: DecoderModel) -> None:
        head_dtype = target.lm_head.weight.dtype
        self.dtype = torch.bfloat16 if head_dtype == torch.bfloat16 else torch.float32
        self.model = model.to(self.dtype).eval()
        self.target = target
        self.config = model.config
        self.name = model.config.kind
        self.feature_layers = model.config.feature_layers
        self.cache = ContextCache()
        self.device = next(target.parameters()).device
        self.vocab = model.draft_vocab()
        # Logit column j is token token_ids[j]; None when the columns are the target's vocabulary.
        self.token_ids = None if self.vocab is None else self.vocab.ids.to(self.device)
        # Not inference_mode: the packed GEMM tracks the head's version to know when to repack.
        with torch.no_grad():
            # In the target's dtype: the LM head itself without a draft vocabulary, else its rows.
            self.head = model.output_layer(target)
        # The proposal's forward and head as C++ calls where our packed bf16 GEMM runs them.
        c = self.config
        self.fused = (
            uses_packed_gemm(self.dtype, self.device)
            and self.head.weight.dtype == self.dtype
            and c.hidden_size % 2 == 0
            and c.intermediate_size % 2 == 0
        )

    def observe(self, seq_id: str, features: torch.Tensor, start: int) -> None:
        self.cache.observe(seq_id, features.to(self.dtype), start)

    def release(self, seq_id: str) -> None:
        self.cache.release(seq_id)

    def ready(self, requests: list[DraftRequest]) -> list[int]:
        """Indices of the requests that can be drafted now: every feature before the anchor is here
        (the anchor's own come with the next verify). A guess past the committed tokens never is:
        whether its features arrived first is a race, and a seeded request must not depend on one."""
        return [
            i
            for i, r in enumerate(requests)
            if r.max_tokens > 0
            and not r.ahead
            and self.cache.num_features(r.seq_id) >= len(r.token_ids) - 1 > 0
        ]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., K] over the output columns of final-normed drafter states [..., d]."""
        return self.model.output_logits(hidden.to(self.head.weight.dtype), self.target, self.head).float()

    def target_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Draft distributions over the output columns → over the target's vocabulary (0 outside
        the draft vocabulary), as verification reads them."""
        return probs if self.vocab is None else self.vocab.scatter(probs)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed(ids).to(self.dtype)
