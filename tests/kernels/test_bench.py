"""`specray bench kernels` runs end to end; on CPU it times the twins only, and only when asked."""

from __future__ import annotations

import argparse
import json

import pytest

from specray.kernels.bench import add_bench_kernels_parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_kernels_parser(parser.add_subparsers())
    return parser.parse_args(["kernels", *argv])


def test_cpu_run_times_the_twins(tmp_path) -> None:
    out = tmp_path / "bench.json"
    args = parse(
        [
            "--shapes",
            "tiny",
            "--batch-sizes",
            "1,3",
            "--num_slots",
            "2",
            "--context",
            "20",
            "--device",
            "cpu",
            "--output",
            str(out),
        ]
    )
    result = args.func(args)
    assert [(r["kernel"], r["batch"]) for r in result["rows"]] == [
        (kernel, batch) for batch in (1, 3) for kernel in ("acceptance", "markov", "attention")
    ]
    assert all(r["twin_ms"] > 0 and r["triton_ms"] is None for r in result["rows"])
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_refuses_without_gpu_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = parse(["--shapes", "tiny"])
    with pytest.raises(SystemExit, match="--device cpu"):
        args.func(args)
