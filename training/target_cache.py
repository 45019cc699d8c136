"""`specray train cache`: the target cache — what training reads instead of running the target.

Per token: the concatenated raw outputs of the drafter's feature layers and the final-normed hidden
state (bf16, stored as raw uint16 bits since NumPy has no bfloat16), the token id and the loss mask
(1 on the target's response). Records are grouped in shards of memory-mapped .npy files; each shard
is written under a temporary name and renamed when complete, so an interrupted run resumes at the
first missing shard. `manifest.json` says what the cache holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specray.training.regenerate import read_responses
from specray.workers.drafters.config import spread_feature_layers
from specray.workers.engine.model_runner import ModelRunner, ScheduledSequence
from specray.workers.models.dtype import DTYPE_CHOICES
from specray.workers.models.loader import LoadedModel, load_model

MIN_LOSS_TOKENS = 14  # DeepSpec drops samples with fewer supervised tokens
ARRAYS = ("features", "final", "ids", "loss_mask")


@dataclass(frozen=True)
class CacheConfig:
    target: str = "smollm2-135m"
    data_dir: Path = Path(".scratch/train/data")
    out_dir: Path = Path(".scratch/train/cache")
    num_features: int = 5  # m: feature layers, spread by DSpark's rule
    shard_records: int = 32
    batch_tokens: int = 2048
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not 1 <= self.num_features <= 8:
            raise ValueError("num_features must be in 1..8")
        if self.shard_records < 1 or self.batch_tokens < 1:
            raise ValueError("shard_records and batch_tokens must be >= 1")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, not {self.dtype!r}")


@dataclass
class CachedSample:
    features: torch.Tensor  # [L, m·d] fp32
    final_hidden: torch.Tensor  # [L, d] fp32
    ids: torch.Tensor  # [L] long
    loss_mask: torch.Tensor  # [L] bool: the token at this position is response text

    def to(self, device: str | torch.device) -> CachedSample:
        return CachedSample(
            *(t.to(device) for t in (self.features, self.final_hidden, self.ids, self.loss_mask))
        )


class TargetFeatureRunner:
    """Runs the target over whole records and returns their samples, as the cache stores them.

    Features and final hidden states are rounded through bf16, the cache's storage type, so a drafter
    trained on features computed online sees the numbers it would have read from the cache."""

    def __init__(self, target: LoadedModel, feature_layers: tuple[int, ...], batch_tokens: int) -> None:
        self.batch_tokens = batch_tokens
        self.runner = ModelRunner(target.model, 4 * batch_tokens, 16, feature_layers)

    def samples(self, records: list[dict]) -> list[CachedSample]:
        out = []
        for batch in _batches(records, self.batch_tokens):
            scheduled = [
                ScheduledSequence(f"features-{i}", r["prompt_ids"] + r["output_ids"], 1)
                for i, r in enumerate(batch)
            ]
            result = self.runner.run(scheduled, return_final_hidden=True)
            for i, r in enumerate(batch):
                self.runner.free(f"features-{i}")
                device = result.features[i].device
                mask = [False] * len(r["prompt_ids"]) + [True] * len(r["output_ids"])
                out.append(
                    CachedSample(
                        features=result.features[i].to(torch.bfloat16).float(),
                        final_hidden=result.final_hidden[i].to(torch.bfloat16).float(),
                        ids=torch.tensor(r["prompt_ids"] + r["output_ids"], dtype=torch.long, device=device),
                        loss_mask=torch.tensor(mask, dtype=torch.bool, device=device),
                    )
                )
        return out


def usable_records(data_dir: Path, split: str) -> list[dict]:
    """A split's regenerated records with enough response tokens to train on."""
    return [r for r in read_responses(data_dir, split) if len(r["output_ids"]) >= MIN_LOSS_TOKENS]


def build_cache(config: CacheConfig, target: LoadedModel | None = None, progress: bool = True) -> dict:
    target = target or load_model(config.target, config.dtype, config.device)
    layers = spread_feature_layers(target.config.num_layers, config.num_features)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "target": config.target,
        "feature_layers": list(layers),
        "hidden_size": target.config.hidden_size,
        "splits": {},
    }
    runner = TargetFeatureRunner(target, layers, config.batch_tokens)
    for split in ("train", "valid"):
        records = usable_records(config.data_dir, split)
        shards = []
        starts = range(0, len(records), config.shard_records)
        for number, start in enumerate(
            tqdm(starts, desc=f"cache {split}", unit="shard", disable=not progress)
        ):
            name = f"{split}-{number:05d}"
            if not (out / f"{name}.json").exists():
                _write_shard(runner.samples(records[start : start + config.shard_records]), out, name)
            shards.append(name)
        manifest["splits"][split] = shards
    (out / "manifest.json").write_text(json.dumps({**manifest, "config": _jsonable(config)}, indent=2))
    return manifest


def _write_shard(samples: list[CachedSample], out: Path, name: str) -> None:
    arrays = {
        "features": [_bf16_bits(s.features) for s in samples],
        "final": [_bf16_bits(s.final_hidden) for s in samples],
        "ids": [s.ids.cpu().numpy().astype(np.int32) for s in samples],
        "loss_mask": [s.loss_mask.cpu().numpy().astype(np.uint8) for s in samples],
    }
    lengths = [s.ids.shape[0] for s in samples]
    for key in ARRAYS:
        tmp = out / f"{name}.{key}.tmp.npy"
        np.save(tmp, np.concatenate(arrays[key]))
        tmp.rename(out / f"{name}.{key}.npy")
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).tolist()
    index = {"records": [{"offset": int(o), "length": int(n)} for o, n in zip(offsets, lengths)]}
    # The index is written last: its presence marks the shard complete.
    (out / f"{name}.json").write_text(json.dumps(index))


def _batches(records: list[dict], batch_tokens: int) -> list[list[dict]]:
    batches, current, size = [], [], 0
    for r in records:
        n = len(r["prompt_ids"]) + len(r["output_ids"])
        if current and size + n > batch_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(r)
        size += n
    return batches + ([current] if current else [])


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def _from_bf16_bits(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).float()


def _jsonable(config: CacheConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


class TargetCache:
    """Read one split of a built cache; samples are sliced from memory-mapped shards on demand."""

    def __init__(self, cache_dir: str | Path, split: str) -> None:
        self.dir = Path(cache_dir)
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"no target cache at {self.dir} (run `specray train cache` first)")
        self.manifest = json.loads(manifest_path.read_text())
        self.feature_layers = tuple(self.manifest["feature_layers"])
        self._shards = {}
        self._index: list[tuple[str, int, int]] = []
        for name in self.manifest["splits"].get(split, []):
            records = json.loads((self.dir / f"{name}.json").read_text())["records"]
            self._index.extend((name, r["offset"], r["length"]) for r in records)

    def __len__(self) -> int:
        return len(self._index)

    def _arrays(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._shards:
            self._shards[name] = {k: np.load(self.dir / f"{name}.{k}.npy", mmap_mode="r") for k in ARRAYS}
        return self._shards[name]

    def samples(self, indices: list[int]) -> list[CachedSample]:
        return [self[i] for i in indices]

    def token_samples(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, loss mask) of every sample, without reading features."""
        for i in range(len(self)):
            a, rows = self._rows(i)
            yield _ids_and_mask(a, rows)

    def __getitem__(self, i: int) -> CachedSample:
        a, rows = self._rows(i)
        ids, loss_mask = _ids_and_mask(a, rows)
        return CachedSample(
            features=_from_bf16_bits(a["features"][rows]),
            final_hidden=_from_bf16_bits(a["final"][rows]),
            ids=ids,
            loss_mask=loss_mask,
        )

    def _rows(self, i: int) -> tuple[dict[str, np.ndarray], slice]:
        """Sample i's shard arrays and its rows in them."""
        name, offset, length = self._index[i]
        return self._arrays(name), slice(offset, offset + length)


def _ids_and_mask(a: dict[str, np.ndarray], rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(np.array(a["ids"][rows], dtype=np.int64)),
        torch.from_numpy(np.array(a["loss_mask"][rows], dtype=np.bool_)),
    )
