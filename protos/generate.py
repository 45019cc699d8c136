"""Regenerate the Python stubs of `protos/specray/v1/*.proto` (`make protos`).

The stubs are committed; `--check` exits non-zero when they differ from what the .proto files give,
and a test runs it so stale stubs fail CI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_DIR = PROTO_ROOT / "specray" / "v1"
# protoc names modules after the proto package (`specray.v1`); they live under `specray.protos`.
_IMPORT_FIX = ("from specray.v1 import", "from specray.protos.specray.v1 import")


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under out_root/specray/v1 and return their paths."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    stubs = sorted((out_root / "specray" / "v1").glob("*_pb2*.py*"))
    for stub in stubs:
        stub.write_text(stub.read_text().replace(*_IMPORT_FIX))
    return stubs


def stale_stubs() -> list[str]:
    """Names of committed stubs that are missing or differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for stub in fresh:
            committed = PROTO_DIR / stub.name
            if not committed.exists() or committed.read_text() != stub.read_text():
                stale.append(stub.name)
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale stubs (run `make protos`): {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    for stub in generate(PROTO_ROOT):
        print(stub.relative_to(PROTO_ROOT.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
