"""DrafterConfig's confidence calibration: per-position shifts default to zero, configs saved
before they existed still load, and a config with a shift list it cannot use is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from specray.workers.drafters.config import DrafterConfig


def _config(**kwargs: object) -> DrafterConfig:
    return DrafterConfig(
        kind="dspark",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        feature_layers=(1, 2),
        draft_block_size=4,
        markov_rank=4,
        confidence=True,
        **kwargs,
    )


def test_a_config_saved_without_shifts_loads_with_zeros(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    _config(confidence_temperatures=(1.0, 1.5, 2.0, 2.5)).save(path)
    fields = json.loads(path.read_text())
    del fields["confidence_shifts"]  # as written before the field existed
    path.write_text(json.dumps(fields))
    loaded = DrafterConfig.load(path)
    assert loaded.confidence_shifts == (0.0,) * 4, f"an old config loaded shifts {loaded.confidence_shifts}"
    assert loaded.confidence_temperatures == (1.0, 1.5, 2.0, 2.5), "the temperatures did not survive"


def test_calibrated_shifts_round_trip(tmp_path: Path) -> None:
    calibrated = _config().calibrated(
        temperatures=[1.0, 1.2, 1.4, 1.6], shifts=[0.5, -0.25, 0, 1], ngram_acceptance=[]
    )
    calibrated.save(tmp_path / "config.json")
    loaded = DrafterConfig.load(tmp_path / "config.json")
    assert loaded.confidence_shifts == (0.5, -0.25, 0.0, 1.0), (
        f"shifts saved, {loaded.confidence_shifts} loaded"
    )
    assert loaded == calibrated, "the calibrated config did not round-trip through config.json"


@pytest.mark.parametrize(
    "shifts", [(0.0, 0.0, 0.0), (0.0,) * 5, (0.0, math.nan, 0.0, 0.0), (0.0, 0.0, math.inf, 0.0)]
)
def test_a_shift_list_that_is_not_one_finite_value_per_position_is_refused(shifts: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="one finite confidence shift per block position"):
        _config(confidence_shifts=shifts)
