"""The one-slot GPU recipe (`training/gpu_recipe.sh`), run at toy size on the CPU: every step runs
and the export holds what comes back from the device, within its limits (≤ 8 files, ≤ 16 MiB each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_recipe_at_toy_size_exports_every_drafter(smollm2, tmp_path) -> None:  # noqa: ANN001
    toy = (
        "--num-train 8 --num-valid 4 --max-new-tokens 24 --data-workers 2 --batch-size 4 --shard-size 2"
        " --data-minutes 5 --fit-minutes 5 --sequences-per-step 2 --anchors-per-sequence 8"
    )
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "RECIPE_WORK": str(tmp_path / "work"),
        "RECIPE_ARGS": toy,
    }
    done = subprocess.run(
        ["bash", "training/gpu_recipe.sh", "run-local"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"the recipe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    expected = sorted(
        [f"{k}.{n}" for k in ("dspark", "dflash", "eagle3") for n in ("config.json", "model.safetensors")]
        + ["dspark.calibration.json", "recipe.json"]
    )
    assert files == expected, f"export holds {files}"
    assert all((tmp_path / "out" / f).stat().st_size <= 16 * 2**20 for f in files), "a file over 16 MiB"
    report = json.loads((tmp_path / "out" / "recipe.json").read_text())
    # Two workers shared the 4 + 2 shards; 2 records a step, one epoch.
    assert report["data"]["responses"] == {"valid": 4, "train": 8}, report["data"]
    for kind in ("dspark", "dflash", "eagle3"):
        assert report["fit"][kind]["steps"] >= 1, report["fit"]
    assert set(report["score"]["T=0"]) == {"dspark", "dflash", "eagle3"}, report["score"]
    calibration = json.loads((tmp_path / "out" / "dspark.calibration.json").read_text())
    assert calibration["blocks"] > 0, "dspark was calibrated on no block"
