"""`specray train score`: drafters' acceptance estimated on the held-out target cache, no engine.

Every response position of the split is an anchor, and each block is scored teacher-forced: slot
k's previous token is the cached x_{k−1}, which is what inference sees while the earlier drafts are
accepted.
- T = 0: draft k counts as accepted when it and every earlier draft reproduce the cached text. This
  is exact for the greedy half of the data.
- T = 1: draft k survives with probability 1 − ½‖p_d − p_t‖₁. The expected accepted prefix is
  Σ_k Π_{i≤k}, with p_t taken from the cached final hidden states.
τ = 1 + the expected accepted drafts (the bonus token). This ranks drafters in seconds on CPU, where
an engine run takes minutes, and without the noise of a few prompts. `specray eval drafter` stays
the measure that counts. Reports use `specray eval drafter`'s schema, so its plot draws them too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from specray.training.objective import choose_anchors, teacher_forced_blocks
from specray.training.online_features import FeatureSource, open_features
from specray.workers.drafters.checkpoint import load_drafter_model
from specray.workers.models.loader import LoadedModel


@torch.inference_mode()
def score_drafter(
    drafter: str | Path, target: LoadedModel, cache: FeatureSource, progress: bool = True
) -> dict[float, dict]:
    """{temperature: {"drafter", "tau", "accept_by_position", "anchors", "vocab_coverage"}} for T = 0
    and T = 1; vocab_coverage is the share of the split's response tokens inside the drafter's draft
    vocabulary (1 without one)."""
    device = next(target.model.parameters()).device
    model = load_drafter_model(drafter, device).eval()
    vocab = model.draft_vocab()
    block_len = model.config.draft_block_size
    greedy, sampled, anchors = torch.zeros(block_len), torch.zeros(block_len), 0
    covered, responses = 0, 0
    # EAGLE-3's first step reads position anchor−1, so anchors start at 1 for every kind alike.
    for i in tqdm(range(len(cache)), desc=f"score {Path(drafter).name}", disable=not progress):
        sample = cache[i].to(device)
        response = sample.ids[sample.loss_mask]
        responses += response.numel()
        covered += response.numel() if vocab is None else int((vocab.to_draft(response) >= 0).sum())
        at = choose_anchors(sample.loss_mask, sample.ids.shape[0], torch.Generator(), min_anchor=1)
        if at.numel() == 0:
            continue
        blocks = teacher_forced_blocks(model, target.model, [sample], [at])
        hit = (blocks.greedy_tokens() == blocks.labels) & blocks.supervised
        greedy += hit.long().cumprod(1).sum(0).float().cpu()
        sampled += (blocks.survival() * blocks.supervised).cumprod(1).sum(0).cpu()
        anchors += at.numel()
    name = Path(drafter).name
    reports = {}
    for temperature, accepted in ((0.0, greedy), (1.0, sampled)):
        by_position = (accepted / max(anchors, 1)).tolist()
        reports[temperature] = {
            "drafter": name,
            "tau": 1.0 + sum(by_position),
            "accept_by_position": by_position,
            "anchors": anchors,
            "vocab_coverage": covered / max(responses, 1),
        }
    return reports


def score_drafters(
    drafters: list[str | Path], target: LoadedModel, target_name: str, cache_dir: Path, split: str = "valid"
) -> list[dict]:
    """One report per temperature, in `specray eval drafter`'s schema (dataset = the cache split)."""
    # Online features (a data directory) are computed at the first drafter's layers.
    cache = open_features(cache_dir, split, target, load_drafter_model(drafters[0]).config.feature_layers)
    if len(cache) == 0:
        raise ValueError(f"the target cache at {cache_dir} has no {split!r} samples")
    scored = [score_drafter(d, target, cache) for d in drafters]
    return [
        {
            "target": target_name,
            "dataset": f"cache:{split} (teacher-forced estimate)",
            "temperature": temperature,
            "results": [s[temperature] for s in scored],
        }
        for temperature in (0.0, 1.0)
    ]
