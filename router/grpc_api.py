"""The client gRPC API (`specray.v1.Generation`), served by each router replica on 127.0.0.1.

Ray Serve's own gRPC proxy listens on every interface ([::]), which this project does not allow,
so the router runs its own `grpc.aio` server; both APIs share `Generation`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from specray.protos.specray.v1 import generate_pb2 as pb
from specray.protos.specray.v1 import generate_pb2_grpc
from specray.router.generation import Delta, Generation, GenerationRequest, RequestError, Unavailable


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    def _build(self, request: pb.GenerateRequest) -> GenerationRequest:
        messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
        if messages is None and not request.prompt:
            raise RequestError("give a prompt or messages")
        return self.generation.build(
            prompt=None if messages else request.prompt,
            messages=messages,
            max_tokens=request.max_tokens or None,
            temperature=request.temperature if request.HasField("temperature") else None,
            top_p=request.top_p if request.HasField("top_p") else None,
            top_k=request.top_k if request.HasField("top_k") else None,
            seed=request.seed if request.HasField("seed") else None,
            stop=list(request.stop),
            session_id=request.session_id or None,
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        try:
            built = self._build(request)
            return _response(built, await self.generation.complete(built))
        except RequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Unavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            built = self._build(request)
            async for delta in self.generation.stream(built):
                yield _response(built, delta)
        except RequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Unavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))


def _response(request: GenerationRequest, delta: Delta) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request.request_id,
        session_id=request.session_id,
        text=delta.text,
        token_ids=delta.token_ids,
    )
    if delta.finish_reason:
        response.finish_reason = delta.finish_reason
        prompt = len(request.prompt_ids)
        response.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=prompt,
                completion_tokens=delta.completion_tokens,
                total_tokens=prompt + delta.completion_tokens,
            )
        )
        response.stats.CopyFrom(
            pb.SpeculationStats(
                verify_steps=delta.verify_steps,
                draft_tokens=delta.draft_tokens,
                accepted_tokens=delta.accepted_tokens,
                tau=delta.tau,
            )
        )
    return response
