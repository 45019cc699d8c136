"""`specray train recipe`: the whole pipeline in one timed run — the plan for one lent GPU slot.

data (N regeneration processes sharing the shards, each stopping at the data budget) → fit of each
drafter kind in parallel on the same data and budget, the target's features computed online (no
cache on disk) → calibration of the kinds with a confidence head → the teacher-forced τ estimate on
the held-out split → the checkpoints copied flat into an export folder (`<kind>.config.json`,
`<kind>.model.safetensors`, `<kind>.calibration.json`, and `recipe.json` with counts and times).

Every step is resumable, so a run cut short by its slot can be run again to finish. The steps run
as `specray train ...` processes: the GPU is shared by processes, since one engine process is
bound by its per-step Python work long before the GPU is busy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specray.training.regenerate import SPLITS, read_responses

KINDS = ("dspark", "dflash", "eagle3")
# Files each kind's checkpoint is served from (the training state and logs stay behind).
EXPORTED = ("config.json", "model.safetensors", "calibration.json")


@dataclass(frozen=True)
class RecipeConfig:
    out_dir: Path
    export_dir: Path
    target: str = "smollm2-135m"
    sharegpt: Path | None = None
    prompt_turns: str = "all"
    num_train: int = 60_000
    num_valid: int = 256
    max_prompt_tokens: int = 256
    max_new_tokens: int = 256
    data_workers: int = 12
    batch_size: int = 512
    shard_size: int = 1024
    data_minutes: float = 4.0
    fit_minutes: float = 2.5
    kinds: tuple[str, ...] = KINDS
    num_layers: int = 1
    epochs: int = 1
    sequences_per_step: int = 16
    anchors_per_sequence: int = 64
    lr: float = 1e-3
    device: str = "cpu"
    dtype: str = "auto"
    fit_extra: tuple[str, ...] = field(default=("--markov-rank", "256", "--markov-tied", "--state-input"))

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be some of {KINDS}, got {self.kinds}")
        if min(self.data_workers, self.num_train, self.num_valid) < 1:
            raise ValueError("data_workers, num_train and num_valid must be >= 1")
        if min(self.data_minutes, self.fit_minutes) <= 0:
            raise ValueError("data_minutes and fit_minutes must be > 0")


def _specray(*args: str) -> list[str]:
    return [sys.executable, "-m", "specray.cluster.commands.cli", *args]


def _run_all(commands: list[list[str]], logs: list[Path], deadline_s: float) -> list[int]:
    """Run commands side by side, each logging to its file; kill any still running at the deadline."""
    processes = []
    for command, log in zip(commands, logs):
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as sink:
            processes.append(subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT))
    end = time.monotonic() + deadline_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return [p.returncode for p in processes]


def _check(step: str, codes: list[int], logs: list[Path]) -> None:
    failed = [(code, log) for code, log in zip(codes, logs) if code != 0]
    if failed:
        code, log = failed[0]
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"{step}: {len(failed)} process(es) failed; rc {code}, {log}:\n{tail}")


def run_recipe(config: RecipeConfig) -> dict:
    out, export = Path(config.out_dir), Path(config.export_dir)
    data, logs = out / "data", out / "logs"
    report: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}}
    started = time.monotonic()

    data_args = [
        "train", "data", "--target", config.target, "--out", str(data),
        "--num-train", str(config.num_train), "--num-valid", str(config.num_valid),
        "--max-prompt-tokens", str(config.max_prompt_tokens), "--max-new-tokens", str(config.max_new_tokens),
        "--batch-size", str(config.batch_size), "--shard-size", str(config.shard_size),
        "--prompt-turns", config.prompt_turns, "--device", config.device, "--dtype", config.dtype,
        "--time-budget-minutes", str(config.data_minutes),
    ]  # fmt: skip
    if config.sharegpt is not None:
        data_args += ["--sharegpt", str(config.sharegpt)]
    plan_log = logs / "data-plan.log"
    _check("data plan", _run_all([_specray(*data_args, "--plan-only")], [plan_log], 600), [plan_log])
    n = config.data_workers
    commands = [_specray(*data_args, "--worker", f"{w}/{n}") for w in range(n)]
    data_logs = [logs / f"data-{w}.log" for w in range(n)]
    # A shard in flight at the budget still finishes; the hard stop leaves a minute for it.
    codes = _run_all(commands, data_logs, 60 * config.data_minutes + 60)
    records = {split: read_responses(data, split) for split in SPLITS}
    report["data"] = {
        "seconds": round(time.monotonic() - started, 1),
        "responses": {split: len(r) for split, r in records.items()},
        "response_tokens": {split: sum(len(x["output_ids"]) for x in r) for split, r in records.items()},
        "exit_codes": codes,
    }
    if not records["train"] or not records["valid"]:
        _check("data", codes, data_logs)
        raise RuntimeError(f"data: no complete shard of each split in {data} (see {logs})")

    fit_started = time.monotonic()
    fit_logs = [logs / f"fit-{kind}.log" for kind in config.kinds]
    commands = [
        _specray(
            "train",
            "fit",
            "--kind",
            kind,
            "--target",
            config.target,
            "--cache",
            str(data),
            "--out",
            str(out / kind),
            "--num-layers",
            str(config.num_layers),
            "--epochs",
            str(config.epochs),
            "--sequences-per-step",
            str(config.sequences_per_step),
            "--anchors-per-sequence",
            str(config.anchors_per_sequence),
            "--lr",
            str(config.lr),
            "--device",
            config.device,
            "--time-budget-minutes",
            str(config.fit_minutes),
            *config.fit_extra,
        )  # fmt: skip
        for kind in config.kinds
    ]
    _check("fit", _run_all(commands, fit_logs, 60 * config.fit_minutes + 120), fit_logs)
    report["fit"] = {"seconds": round(time.monotonic() - fit_started, 1)}
    for kind in config.kinds:
        log = json.loads((out / kind / "train_log.json").read_text())
        report["fit"][kind] = {
            k: log[k] for k in ("steps", "sequences", "steps_per_second_this_run", "final")
        }

    after_started = time.monotonic()
    calibrated = [k for k in config.kinds if k == "dspark"]
    for kind in calibrated:
        log = logs / f"calibrate-{kind}.log"
        command = _specray("train", "calibrate", "--drafter", str(out / kind), "--cache", str(data),
                           "--device", config.device)  # fmt: skip
        _check("calibrate", _run_all([command], [log], 600), [log])
    score_json = out / "score.json"
    score_args = [
        "train",
        "score",
        "--target",
        config.target,
        "--cache",
        str(data),
        "--json",
        str(score_json),
    ]
    for kind in config.kinds:
        score_args += ["--drafter", str(out / kind)]
    _check("score", _run_all([_specray(*score_args)], [logs / "score.log"], 600), [logs / "score.log"])
    report["score"] = {
        f"T={r['temperature']:g}": {x["drafter"]: round(x["tau"], 4) for x in r["results"]}
        for r in json.loads(score_json.read_text())
    }
    report["calibrate_and_score_seconds"] = round(time.monotonic() - after_started, 1)
    report["seconds"] = round(time.monotonic() - started, 1)

    export.mkdir(parents=True, exist_ok=True)
    for kind in config.kinds:
        for name in EXPORTED:
            if (out / kind / name).exists():
                shutil.copyfile(out / kind / name, export / f"{kind}.{name}")
    (export / "recipe.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
