"""The `specray` command line: help without the heavy libraries, defaults shown, --version, and the
light copies of names (default model, drafter kinds, bundled drafters) equal to their sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from specray import __version__
from specray.cluster.commands.cli import COMMANDS, build_parser, main
from specray.cluster.commands.help_text import DRAFTER_HELP
from specray.cluster.commands.serve_command import load_config
from specray.cluster.commands.train_command import KIND_NAMES
from specray.defaults import DEFAULT_MODEL

HEAVY = ("torch", "ray", "transformers")
# Every command line whose --help must stay light. `bench kernels` is not among them: its
# registrar lives in kernels/bench.py, which imports torch at module level.
HELP_COMMANDS = [
    [],
    *([name] for name in COMMANDS),
    ["bench", "engine"],
    ["bench", "serve"],
    ["train", "data"],
    ["train", "fit"],
    ["eval", "drafter"],
    ["cluster", "up"],
    ["cluster", "kill-node"],
]


def _help_imports(argv: list[str]) -> tuple[str, list[str]]:
    """`specray <argv> --help` in a fresh interpreter: its output and the heavy modules it loaded."""
    script = (
        "import contextlib, io, json, sys\n"
        "from specray.cluster.commands.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        f"    main({argv + ['--help']!r})\n"
        f"print(json.dumps([out.getvalue(), sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    # Wide lines: argparse wraps help text at $COLUMNS, which would split what the tests look for.
    env = {**os.environ, "SPECRAY_API_KEY": "do-not-print-me", "COLUMNS": "250"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    text, heavy = json.loads(result.stdout)
    return text, heavy


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=lambda argv: " ".join(argv) or "specray")
def test_help_loads_neither_torch_nor_ray_nor_transformers(argv):
    text, heavy = _help_imports(argv)
    assert text.startswith("usage: specray") and heavy == []
    assert "do-not-print-me" not in text  # defaults are shown, but no key read from the environment


def test_help_shows_defaults():
    assert "(default: 128)" in _help_imports(["generate"])[0]  # --max-tokens
    serve_help = _help_imports(["serve"])[0]
    for shown in ("(default: 8000)", "(default: 127.0.0.1", "(default: info)", f"(default: {DEFAULT_MODEL})"):
        assert shown in serve_help


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"specray {__version__}"


def test_serve_host_and_log_level_reach_the_config():
    config = load_config(build_parser().parse_args(["serve", "--host", "0.0.0.0", "--log-level", "warning"]))
    assert (config.host, config.log_level) == ("0.0.0.0", "warning")


def test_light_copies_equal_their_sources():
    from specray.workers.drafters.checkpoint import BUNDLED_DRAFTERS
    from specray.workers.drafters.kinds import TRAINED_KINDS
    from specray.workers.models.loader import DEFAULT_MODEL as LOADER_DEFAULT

    assert DEFAULT_MODEL == LOADER_DEFAULT
    assert KIND_NAMES == tuple(TRAINED_KINDS)
    assert BUNDLED_DRAFTERS and all(name in DRAFTER_HELP for name in BUNDLED_DRAFTERS)
