"""How a draft session talks to its verifier: one ordered, bidirectional message stream.

The draft worker uses a gRPC stream (`workers/draft_worker/deployment.py`); the tests drive the
same protocol in one process (`tests/local_channel.py`).
"""

from __future__ import annotations

from typing import Protocol

from specray.protos.specray.v1 import verify_pb2 as pb


class SegmentChannel(Protocol):
    async def send(self, message: pb.DraftMessage) -> None: ...

    async def recv(self) -> pb.VerifyMessage: ...

    async def close(self) -> None:
        """End the stream; the verifier then frees the session."""
