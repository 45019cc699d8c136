"""A `SegmentChannel` to a `VerifierCore` in this process: the draft/verify protocol without gRPC."""

from __future__ import annotations

import asyncio

from specray.protos.specray.v1 import verify_pb2 as pb
from specray.workers.verifier.core import VerifierCore


class LocalChannel:
    def __init__(self, core: VerifierCore) -> None:
        self.core = core
        self._replies: asyncio.Queue[pb.VerifyMessage] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._session_id: str | None = None

    async def send(self, message: pb.DraftMessage) -> None:
        if message.WhichOneof("kind") == "open":
            self._session_id = message.open.session_id
        task = asyncio.create_task(self._answer(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, message: pb.DraftMessage) -> None:
        reply = await self.core.handle(message)
        if reply is not None:
            await self._replies.put(reply)

    async def recv(self) -> pb.VerifyMessage:
        return await self._replies.get()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._session_id is not None:
            self.core.close(self._session_id)
