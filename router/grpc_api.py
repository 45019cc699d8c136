"""The client gRPC API (`specray.v1.Generation`), served by each router replica on 127.0.0.1.

Ray Serve's own gRPC proxy listens on every interface ([::]), which this project does not allow,
so the router runs its own `grpc.aio` server; both APIs share `Generation`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from specray.protos.specray.v1 import generate_pb2 as pb
from specray.protos.specray.v1 import generate_pb2_grpc
from specray.router.generation import (
    Delta,
    Generation,
    GenerationRequest,
    Overloaded,
    RequestError,
    Unavailable,
)


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    def _build(self, request: pb.GenerateRequest | None) -> GenerationRequest:
        if request is None:
            raise RequestError("the request is not a valid specray.v1.GenerateRequest")
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
        except (RequestError, Unavailable, Overloaded) as err:
            await _abort(context, err)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            built = self._build(request)
            async for delta in self.generation.stream(built):
                yield _response(built, delta)
        except (RequestError, Unavailable, Overloaded) as err:
            await _abort(context, err)


async def _abort(context: grpc.aio.ServicerContext, err: Exception) -> None:
    if isinstance(err, Overloaded):
        retry_after = (("retry-after", str(err.retry_after_s)),)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), trailing_metadata=retry_after)
    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(err, RequestError) else grpc.StatusCode.UNAVAILABLE
    await context.abort(code, str(err))


def _lenient(data: bytes) -> pb.GenerateRequest | None:
    # gRPC answers a request it cannot parse with INTERNAL; None lets the servicer say INVALID_ARGUMENT.
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError:
        return None


def add_generation_service(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """`add_GenerationServicer_to_server`, but a malformed message (bad protobuf, invalid UTF-8 in a
    string) reaches the servicer as None instead of failing inside gRPC."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_lenient,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            request_deserializer=_lenient,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("specray.v1.Generation", handlers),)
    )
    server.add_registered_method_handlers("specray.v1.Generation", handlers)


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
