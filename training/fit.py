"""`specray train fit`: train a DSpark, DFlash or EAGLE-3 drafter from the target cache.

AdamW (weight decay 0), linear warm-up then cosine decay to 0, gradient clipping; fp32 master
weights, bf16 autocast on GPU (and on CPU when asked). Each optimizer step scores a few sequences
in one padded drafter forward, each contributing many anchors under its own mask. Samples come from
the target cache, or are computed online from `specray train data`'s records (`online_features.py`).
The full training state is saved every `save_every` steps and `save_every_minutes`
(`checkpointing.py`), so a rerun resumes where it stopped, with the same result; the final drafter
is written as config.json + model.safetensors.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from specray.training.checkpointing import TrainingCheckpoint
from specray.training.objective import choose_anchors, drafter_loss, teacher_forced_blocks
from specray.training.online_features import is_target_cache, open_features
from specray.training.target_cache import CachedSample
from specray.workers.drafters.checkpoint import DrafterModel, build_model, save_drafter_model
from specray.workers.drafters.config import DrafterConfig, spread_feature_layers
from specray.workers.drafters.draft_vocab import frequent_tokens
from specray.workers.drafters.kinds import TrainedKind, trained_kind
from specray.workers.drafters.loss_weights import LossWeights
from specray.workers.engine.host_memory import keep_freed_memory
from specray.workers.models.decoder import DecoderModel
from specray.workers.models.dtype import DTYPE_CHOICES, resolve_dtype
from specray.workers.models.loader import LoadedModel, load_model

# Names a mask token may have; the block's MASK input must be a token real text never uses.
_MASK_CANDIDATES = ("<mask>", "<|mask|>", "<repo_name>", "<reponame>", "<unused0>")


@dataclass(frozen=True)
class FitConfig:
    kind: str = "dspark"  # an entry of the drafter table (workers/drafters/kinds.py)
    target: str = "smollm2-135m"
    # A target cache, or a `specray train data` directory: then features are computed online.
    cache_dir: Path = Path(".scratch/train/cache")
    num_features: int = 5  # m target layers when features are computed online (a cache fixes its own)
    # The dtype the target computes online features in (a cache fixes its own): bf16 is what a bf16
    # engine serves the drafter, and 2.3x faster to compute on a CPU with native bf16.
    feature_dtype: str = "float32"
    out_dir: Path = Path(".scratch/train/dspark")
    num_layers: int = 1
    draft_block_size: int = 7
    markov_rank: int = 32
    state_input: bool = False  # block drafters: slot inputs carry H_ctx at anchor−1 (see DrafterConfig)
    markov_tied: bool = False  # DSpark: Markov tables through the target's embedding (see DrafterConfig)
    draft_vocab_size: int = 0  # K > 0: propose only the training data's K most frequent tokens
    markov_candidates: int = 0  # M > 0: drafting samples among each slot's M best columns (DrafterConfig)
    epochs: int = 2
    lr: float = 6e-4
    warmup: float = 0.04
    sequences_per_step: int = 4
    anchors_per_sequence: int = 16
    grad_clip: float = 1.0
    save_every: int = 20
    save_every_minutes: float | None = 10.0
    seed: int = 0
    device: str = "cpu"
    autocast: bool | None = None  # bf16 autocast; None: on for CUDA, off on CPU
    # Wall-clock budget: after a few timed steps the schedule is shortened to end within it.
    time_budget_s: float | None = None
    # The schedule's length in steps when shorter than its epochs (the LR decays to 0 there): what
    # reproduces a budgeted run on another machine.
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError("time_budget_s must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        trained_kind(self.kind)
        if min(self.num_layers, self.draft_block_size, self.epochs, self.sequences_per_step) < 1:
            raise ValueError("num_layers, draft_block_size, epochs and sequences_per_step must be >= 1")
        if self.anchors_per_sequence < 1 or self.lr <= 0 or not 0 <= self.warmup < 1 or self.grad_clip <= 0:
            raise ValueError("need anchors_per_sequence >= 1, lr > 0, 0 <= warmup < 1, grad_clip > 0")
        if min(self.markov_rank, self.draft_vocab_size, self.markov_candidates) < 0:
            raise ValueError("markov_rank, draft_vocab_size and markov_candidates must be >= 0")
        if self.feature_dtype not in DTYPE_CHOICES:
            raise ValueError(f"feature_dtype must be one of {DTYPE_CHOICES}")
        if not 1 <= self.num_features <= 8:
            raise ValueError("num_features must be in 1..8")
        if self.save_every < 1 or (self.save_every_minutes is not None and self.save_every_minutes <= 0):
            raise ValueError("save_every must be >= 1 and save_every_minutes > 0")

    @property
    def use_autocast(self) -> bool:
        return self.device.startswith("cuda") if self.autocast is None else self.autocast

    def schedule_fingerprint(self, sequences: int) -> dict:
        """The settings a resumed run must share with the run that saved the checkpoint."""
        keys = (
            "kind", "target", "num_layers", "draft_block_size", "markov_rank", "state_input", "markov_tied",
            "epochs", "lr", "warmup", "sequences_per_step", "anchors_per_sequence", "grad_clip", "seed",
            "draft_vocab_size", "feature_dtype", "max_steps",
        )  # fmt: skip
        return {**{k: getattr(self, k) for k in keys}, "sequences": sequences}

    @property
    def drafter_kind(self) -> TrainedKind:
        return trained_kind(self.kind)

    @property
    def loss_weights(self) -> LossWeights:
        return self.drafter_kind.loss


def pick_mask_token(target: LoadedModel) -> int:
    vocab = target.tokenizer.get_vocab() if target.tokenizer is not None else {}
    for name in _MASK_CANDIDATES:
        if name in vocab and vocab[name] < target.config.vocab_size:
            return vocab[name]
    return target.config.vocab_size - 1


def drafter_config(config: FitConfig, target: LoadedModel, feature_layers: tuple[int, ...]) -> DrafterConfig:
    kind = config.drafter_kind
    built = DrafterConfig.for_target(
        config.kind,
        target.config,
        len(feature_layers),
        num_layers=config.num_layers,
        draft_block_size=config.draft_block_size,
        markov_rank=config.markov_rank if kind.markov_head else 0,
        state_input=config.state_input and kind.block_slots,
        markov_tied=config.markov_tied and kind.markov_head and config.markov_rank > 0,
        confidence=kind.confidence_head,
        mask_token_id=pick_mask_token(target),
        draft_vocab_size=config.draft_vocab_size,
        markov_candidates=config.markov_candidates if kind.markov_head and config.markov_rank > 0 else 0,
        target_name=config.target,
    )
    # The cache decides which target layers the drafter reads.
    return replace(built, feature_layers=tuple(feature_layers))


def batch_loss(
    model: DrafterModel,
    target: DecoderModel,
    samples: list[CachedSample],
    anchors: list[torch.Tensor],
    weights: LossWeights,
    num_sequences: int,
    teacher: DecoderModel | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean over `num_sequences` of each cached sequence's loss over its anchors (sequences
    left out, e.g. without anchors, count 0), from one drafter forward; the target's distribution
    from `teacher`'s LM head, default the target's."""
    blocks = teacher_forced_blocks(model, target, samples, anchors, teacher)
    return drafter_loss(
        blocks.logits,
        blocks.confidence,
        blocks.target,
        blocks.labels,
        blocks.supervised,
        weights,
        blocks.vocab,
        blocks.sequence_of,
        num_sequences,
    )


def lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def fit(config: FitConfig, target: LoadedModel | None = None, progress: bool = True) -> dict:
    """Train and write the drafter to `config.out_dir`; returns a summary (also in train_log.json)."""
    torch.manual_seed(config.seed)
    keep_freed_memory()  # every step allocates the same large tensors again
    target = target or load_model(config.target, "float32", config.device)
    for p in target.model.parameters():
        p.requires_grad_(False)
    online_layers = spread_feature_layers(target.config.num_layers, config.num_features)
    features_target = target
    feature_dtype = resolve_dtype(config.feature_dtype, config.device)
    if feature_dtype != target.model.lm_head.weight.dtype and not is_target_cache(config.cache_dir):
        # A copy: the drafter keeps reading the fp32 target's embedding and LM head rows; the
        # target's distribution comes from the copy's head, as the features do from its layers.
        features_target = replace(target, model=copy.deepcopy(target.model).to(feature_dtype))
    data = open_features(config.cache_dir, "train", features_target, online_layers)
    if len(data) == 0:
        raise ValueError(f"{config.cache_dir} has no training samples")
    model = build_model(drafter_config(config, target, data.feature_layers)).to(config.device)
    if config.draft_vocab_size:
        model.set_draft_vocab(frequent_tokens(data.token_samples(), config.draft_vocab_size, target))
    model.config.check_target(target.config)
    with torch.no_grad():
        # Start from the target's final norm: the frozen LM head expects states at that scale.
        scale = target.model.model.norm.weight.float()
        model.norm.weight.copy_(scale + 1.0 if target.config.norm_adds_one else scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(data) // config.sequences_per_step)
    planned = steps_per_epoch * config.epochs
    plan = {"total": min(planned, config.max_steps or planned)}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan["total"], config.warmup)
    )
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = TrainingCheckpoint(
        out / "training_state.pt",
        config.schedule_fingerprint(len(data)),
        config.save_every,
        None if config.save_every_minutes is None else 60 * config.save_every_minutes,
    )
    step, history = 0, []
    state = checkpoint.load()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history, plan["total"] = state["step"], state["history"], state["total"]
    autocast = torch.autocast(
        "cuda" if config.device.startswith("cuda") else "cpu",
        dtype=torch.bfloat16,
        enabled=config.use_autocast,
    )
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=plan["total"], initial=step, desc=f"fit {config.kind}", disable=not progress)
    first_step, timing_steps = step, 10
    while step < plan["total"]:
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        chunk = order[within * config.sequences_per_step : (within + 1) * config.sequences_per_step].tolist()
        optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        samples, anchors = [], []
        for i, sample in zip(chunk, data.samples(chunk)):
            rng = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 131 + i)
            # Anchors are drawn on the CPU (the seeded generator lives there), then moved with the sample.
            at = choose_anchors(
                sample.loss_mask.cpu(), config.anchors_per_sequence, rng, config.drafter_kind.first_anchor
            )
            if at.numel() > 0:
                samples.append(sample.to(config.device))
                anchors.append(at.to(config.device))
        if samples:
            with autocast:
                loss, metrics = batch_loss(
                    model,
                    target.model,
                    samples,
                    anchors,
                    config.loss_weights,
                    len(chunk),
                    features_target.model,
                )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        history.append({"step": step, **metrics})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
        if config.time_budget_s is not None and step - first_step == timing_steps:
            per_step = (time.perf_counter() - started) / timing_steps
            affordable = step + int((config.time_budget_s - (time.perf_counter() - started)) / per_step)
            plan["total"] = max(step, min(plan["total"], affordable))
            bar.total = plan["total"]
        if checkpoint.due(step, plan["total"]):
            checkpoint.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "total": plan["total"],
                    "history": history,
                }
            )
    bar.close()
    save_drafter_model(model, out)
    seconds = time.perf_counter() - started
    summary = {
        "kind": config.kind,
        "steps": plan["total"],
        "sequences": len(data),
        "epochs": config.epochs,
        "seconds_this_run": round(seconds, 1),
        "steps_per_second_this_run": round((step - first_step) / seconds, 4) if seconds > 0 else None,
        "final": history[-1] if history else {},
        "first": history[0] if history else {},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    }
    (out / "train_log.json").write_text(json.dumps({**summary, "history": history}, indent=1))
    return summary
