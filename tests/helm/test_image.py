"""The runtime image's build, checked without Docker: its context holds every file the package
installs (the bundled drafters included), and the Dockerfile installs the package, not a checkout."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pattern(line: str) -> re.Pattern[str]:
    """A .dockerignore line as a regex over context-relative paths (Go's filepath.Match, plus `**`)."""
    regex = (
        re.escape(line.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    )
    return re.compile(regex + "$")


def _in_context(path: str, patterns: list[re.Pattern[str]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a directory's exclusion covers it
    return not any(p.match(prefix) for p in patterns for prefix in prefixes)


def test_the_build_context_holds_every_packaged_file():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [_pattern(line) for line in lines if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = set(setuptools["package-dir"].values())
    packaged = [p for p in tracked if p.split("/")[0] in folders and p.endswith(".py")]
    drafter_files = [
        p
        for p in tracked
        if p.startswith("drafters/") and p.count("/") == 2 and not p.startswith("drafters/eval/")
    ]
    assert drafter_files and any(p.endswith("model.safetensors") for p in drafter_files)
    for path in [*packaged, *drafter_files, "pyproject.toml", "README.md"]:
        assert _in_context(path, patterns), f"{path} is left out of the image's build context"


def test_the_dockerfile_installs_the_package_and_checks_its_drafter():
    dockerfile = (REPO / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert not any(" -e " in line or "--editable" in line for line in installs)
    assert any("/tmp/specray-src${extra}" in line for line in installs)
    assert "resolve_drafter_path" in dockerfile and "smollm2-135m-dspark" in dockerfile
