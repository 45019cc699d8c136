"""`specray bench <what>`: benchmarks that report ratios measured in one run."""

from __future__ import annotations

import argparse
import importlib

# "module:function" registering one benchmark under the `bench` sub-parsers.
BENCH_REGISTRARS = (
    "specray.cluster.bench.engine_bench:register",
    "specray.kernels.bench:add_bench_kernels_parser",
    "specray.cluster.bench.serve_bench:register",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (engine, kernels, serving)")
    bench = parser.add_subparsers(dest="bench", required=True)
    for target in BENCH_REGISTRARS:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(bench)
