"""A long training run spans sessions: `train data` and `train fit` killed mid-way (SIGKILL) and
started again continue where they stopped and end with the result of a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fit import write_tiny_responses

from specray.training.checkpointing import ResumeMismatch
from specray.training.fit import FitConfig, fit
from specray.training.regenerate import DataConfig, read_responses, regenerate, shard_paths

REPO = Path(__file__).resolve().parents[2]


def _kill_when(command: list[str], ready: Callable[[], bool], timeout: float = 540.0) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds, and fail if it finished first."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the run ended (rc {process.returncode}) before it could be interrupted: "
                        f"{process.stderr.read().decode()[-2000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached the point to interrupt it")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _fit_config(cache: Path, out: Path) -> FitConfig:
    return FitConfig(
        kind="dspark",
        state_input=True,
        markov_tied=True,
        cache_dir=cache,
        num_features=3,
        out_dir=out,
        markov_rank=8,
        epochs=3,
        lr=3e-3,
        warmup=0.1,
        sequences_per_step=3,
        anchors_per_sequence=8,
        save_every=1,
        save_every_minutes=None,
    )


@pytest.fixture(scope="module")
def tiny_data(tiny_target, tmp_path_factory) -> Path:  # noqa: ANN001
    root = tmp_path_factory.mktemp("resume")
    write_tiny_responses(tiny_target, root / "data", 12, seed=0)
    return root / "data"


def _fit_script(config: FitConfig) -> str:
    """`fit` on the test suite's tiny target, in a process of its own (the CLI needs a model on disk)."""
    args = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    return (
        "import sys, torch; from pathlib import Path; sys.path.insert(0, 'tests');"
        "torch.set_num_threads(1);"
        "from tiny_models import make_tiny_target; from specray.training.fit import FitConfig, fit;"
        f"args = {args!r}; args.update(cache_dir=Path(args['cache_dir']), out_dir=Path(args['out_dir']));"
        "fit(FitConfig(**args), make_tiny_target(), progress=False)"
    )


def test_fit_killed_mid_run_resumes_to_the_uninterrupted_result(tiny_data, tiny_target, tmp_path) -> None:  # noqa: ANN001
    """Online features, a checkpoint every step: kill after step 3 of 12, resume, same weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels, and so the same bits, as the killed process
    try:
        reference = fit(_fit_config(tiny_data, tmp_path / "reference"), tiny_target, progress=False)
        interrupted = _fit_config(tiny_data, tmp_path / "interrupted")
        state_file = interrupted.out_dir / "training_state.pt"

        def past_step_three() -> bool:
            try:
                return torch.load(state_file, weights_only=False)["step"] >= 3
            except (FileNotFoundError, RuntimeError, EOFError):
                return False  # not written yet (an atomic rename: never half-written)

        _kill_when([sys.executable, "-c", _fit_script(interrupted)], past_step_three)
        killed_at = torch.load(state_file, weights_only=False)["step"]
        assert killed_at < reference["steps"], "the kill came after the run had finished"
        resumed = fit(interrupted, tiny_target, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert resumed["steps"] == reference["steps"]
    history = json.loads((interrupted.out_dir / "train_log.json").read_text())["history"]
    expected = json.loads((tmp_path / "reference" / "train_log.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, reference["steps"] + 1)), "steps lost or repeated"
    assert history == expected, f"losses after resuming at step {killed_at} differ from the uninterrupted run"
    got = load_file(interrupted.out_dir / "model.safetensors")
    want = load_file(tmp_path / "reference" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after resuming at step {killed_at}"


def test_fit_refuses_to_resume_another_runs_checkpoint(tiny_data, tiny_target, tmp_path) -> None:  # noqa: ANN001
    config = _fit_config(tiny_data, tmp_path / "run")
    fit(replace(config, epochs=1), tiny_target, progress=False)
    with pytest.raises(ResumeMismatch, match="epochs: 1 → 3"):
        fit(config, tiny_target, progress=False)


SHAREGPT = [
    {"id": f"c{i}", "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]}
    for i, text in enumerate(
        [
            "Write a haiku about the sea.",
            "What is 17 times 23?",
            "Name three prime numbers.",
            "Translate 'good morning' into French.",
            "Give me a Python one-liner that reverses a string.",
            "Why is the sky blue?",
            "List two uses of copper.",
            "Say hello in Spanish.",
        ]
    )
]


@pytest.mark.slow
def test_data_killed_mid_run_resumes_to_the_uninterrupted_result(smollm2, tmp_path) -> None:  # noqa: ANN001
    """Shards of 2 responses, greedy and sampled: kill after the first shard, rerun, same records; the
    uninterrupted reference is written by two workers sharing the shards."""
    source = tmp_path / "sharegpt.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in SHAREGPT))
    common = {
        "num_train": 6, "num_valid": 0, "max_new_tokens": 6, "batch_size": 2, "shard_size": 2,
        "sharegpt": source, "dtype": "float32",
    }  # fmt: skip
    for worker in (0, 1):
        regenerate(
            DataConfig(out_dir=tmp_path / "reference", worker=worker, num_workers=2, **common),
            smollm2,
            progress=False,
        )
    reference = read_responses(tmp_path / "reference", "train")
    assert len(reference) == 6 and {r["mode"] for r in reference} == {"greedy", "sampled"}

    out = tmp_path / "interrupted"
    cli = [sys.executable, "-m", "specray.cluster.commands.cli", "train", "data", "--out", str(out)]
    flags = ["--num-train", "6", "--num-valid", "0", "--max-new-tokens", "6", "--batch-size", "2"]
    flags += ["--shard-size", "2", "--sharegpt", str(source), "--dtype", "float32"]
    _kill_when(cli + flags, lambda: len(shard_paths(out, "train")) >= 1)
    assert len(shard_paths(out, "train")) < 3, "the kill came after the run had finished"
    regenerate(DataConfig(out_dir=out, **common), smollm2, progress=False)
    assert read_responses(out, "train") == reference, "resumed records differ from the uninterrupted run"
