"""The committed gRPC/protobuf stubs match the .proto files (`make protos` regenerates them)."""

from specray.protos.generate import stale_stubs


def test_stubs_are_current():
    assert stale_stubs() == [], "stubs are stale: run `make protos` and commit the result"
