"""The distribution as pip installs it (not the editable checkout): a built wheel carries the bundled
drafters, and they resolve from an unpacked copy of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from specray.workers.drafters.checkpoint import BUNDLED_DRAFTERS

REPO = Path(__file__).resolve().parents[1]
FILES = ("config.json", "model.safetensors", "calibration.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy, so the build's own directories (build/, *.egg-info) stay out of the checkout.
    source = tmp_path_factory.mktemp("source") / "specray"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", ".scratch", "__pycache__", "tests")
    )
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source],
        check=True,
    )
    [built] = dist.glob("specray-*.whl")
    return built


def test_the_wheel_carries_every_bundled_drafter(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert BUNDLED_DRAFTERS
    for drafter in BUNDLED_DRAFTERS:
        for file in FILES:
            assert f"specray/drafters/{drafter}/{file}" in names


def test_bundled_drafters_resolve_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # A fresh interpreter that finds specray in the unpacked wheel first (before the editable
    # checkout), as an installed package; its dependencies come from the environment.
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import specray\n"
        "from specray.workers.drafters.checkpoint import BUNDLED_DRAFTERS, load_drafter_config\n"
        "from specray.defaults import checkout_root\n"
        "print(json.dumps({'package': specray.__file__, 'checkout': str(checkout_root()),\n"
        "    'drafters': {n: [str(p), load_drafter_config(n).kind] for n, p in BUNDLED_DRAFTERS.items()}}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["package"].startswith(str(site))
    assert found["checkout"] == "None"  # an installed package keeps its state in ~/.cache/specray
    assert set(found["drafters"]) == set(BUNDLED_DRAFTERS)
    for path, kind in found["drafters"].values():
        assert Path(path).is_relative_to(site) and kind
        assert all((Path(path) / file).is_file() for file in FILES)
