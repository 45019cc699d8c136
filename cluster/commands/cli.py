"""The `specray` command line: one program, one subcommand per job.

Each subcommand lives in its own module, whose `register(parser)` adds its arguments (and nested
subcommands) to the parser given and sets `func` (called with the parsed args, returns the exit
code). A command's module is imported only when that command is chosen, and imports torch, Ray or
transformers only inside its run functions, so `specray --help` and `specray X --help` stay fast.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from collections.abc import Sequence

from specray import __version__

# Subcommands in the order `specray --help` lists them: name → ("module:function", one-line help).
COMMANDS = {
    "generate": (
        "specray.cluster.commands.generate_command:register",
        "generate text with the in-process engine",
    ),
    "bench": ("specray.cluster.commands.bench_command:register", "benchmarks (engine, kernels, serving)"),
    "train": (
        "specray.cluster.commands.train_command:register",
        "train a drafter: data → cache → fit → calibrate",
    ),
    "eval": ("specray.cluster.commands.eval_command:register", "evaluate drafters"),
    "serve": (
        "specray.cluster.commands.serve_command:register",
        "run the cluster locally: HTTP (OpenAI) and gRPC APIs",
    ),
    "cluster": (
        "specray.cluster.commands.cluster_command:register",
        "a multi-node Ray cluster on this machine for `serve --ray-address` (up, kill-node, down, ...)",
    ),
    "status": (
        "specray.cluster.commands.status_command:register",
        "show a running cluster: health, pools and replicas, verifiers, sessions, Redis",
    ),
    "client": (
        "specray.cluster.commands.client_command:register",
        "send a prompt to a running `specray serve`",
    ),
    "profile": (
        "specray.cluster.commands.profile_command:register",
        "profile target steps/s against batch tokens (the step curve)",
    ),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, also for options without a help text, except where there is
    none to show (None, a False flag)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and _has_default(action):
            action = copy.copy(action)  # the parser keeps its own, unchanged
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        return super()._get_help_string(action) if _has_default(action) else action.help or ""


def _has_default(action: argparse.Action) -> bool:
    # By identity: 0 and 0.0 are defaults worth showing, though they equal False.
    return not (action.default is None or action.default is False or action.default is argparse.SUPPRESS)


class LazyCommands(argparse._SubParsersAction):
    """Subcommands whose arguments are added only once the command line names them.

    `add_command` records a placeholder parser (its name and help are all `--help` lists) and the
    registrar that fills it in; argparse calls this action with the chosen name, and only then is
    that registrar's module imported.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._registrars: dict[str, str] = {}

    def add_command(self, name: str, registrar: str, help_text: str) -> argparse.ArgumentParser:
        parser = self.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        self._registrars[name] = registrar
        return parser

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Sequence[str],
        option_string: str | None = None,
    ) -> None:
        registrar = self._registrars.pop(values[0], None)
        if registrar is not None:
            module, function = registrar.split(":")
            getattr(importlib.import_module(module), function)(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


def add_commands(
    parser: argparse.ArgumentParser, commands: dict[str, tuple[str, str]], dest: str
) -> LazyCommands:
    """Nested subcommands of `parser`, each registered lazily (see `LazyCommands`)."""
    subparsers = parser.add_subparsers(dest=dest, required=True, action=LazyCommands, metavar="COMMAND")
    for name, (registrar, help_text) in commands.items():
        subparsers.add_command(name, registrar, help_text)
    return subparsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specray", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"specray {__version__}")
    add_commands(parser, COMMANDS, "command")
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
