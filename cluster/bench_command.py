"""`specray bench <what>`: benchmarks that report ratios measured in one run."""

from __future__ import annotations

import argparse
import importlib

# Modules exposing `register(bench_subparsers)`, one per benchmark.
BENCH_MODULES = ("specray.cluster.bench_engine",)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (engine, kernels, serving)")
    bench = parser.add_subparsers(dest="bench", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench)
