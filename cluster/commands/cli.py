"""The `specray` command line: one program, one subcommand per job.

Each subcommand lives in its own module, which exposes `register(subparsers)`; that function adds
its parser and sets `func` (called with the parsed args, returns the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register subcommands, in the order `specray --help` lists them.
SUBCOMMAND_MODULES = (
    "specray.cluster.commands.generate_command",
    "specray.cluster.commands.bench_command",
    "specray.cluster.commands.train_command",
    "specray.cluster.commands.eval_command",
    "specray.cluster.commands.serve_command",
    "specray.cluster.commands.client_command",
    "specray.cluster.commands.profile_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specray", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"specray {args.command}: error: {err}", file=sys.stderr)
        return 2
    # Handlers return an exit code, or their results (some benchmarks), which means success.
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
