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
    ModelNotFound,
    Overloaded,
    RequestError,
    Unavailable,
)
from specray.router.openai_responses import MIN_LOGPROB, TokenText
from specray.workers.engine.sampling import TokenLogprob


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.text_of = TokenText(generation.tokenizer)

    def _build(self, request: pb.GenerateRequest | None) -> list[GenerationRequest]:
        if request is None:
            raise RequestError("the request is not a valid specray.v1.GenerateRequest")
        self.generation.check_model(request.model)
        inputs = [name for name in ("prompt", "prompt_token_ids", "messages") if getattr(request, name)]
        if len(inputs) != 1:
            raise RequestError(
                "give exactly one of prompt, prompt_token_ids or messages"
                + (f" (got {' and '.join(inputs)})" if inputs else ""),
                inputs[-1] if inputs else "prompt",
            )
        messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
        prompts = None
        if request.prompt:
            prompts = [request.prompt]
        elif request.prompt_token_ids:
            prompts = [list(request.prompt_token_ids)]

        def optional(name: str) -> float | int | None:
            return getattr(request, name) if request.HasField(name) else None

        return self.generation.build(
            prompts=prompts,
            messages=messages,
            max_tokens=request.max_tokens or None,
            temperature=optional("temperature"),
            top_p=optional("top_p"),
            top_k=optional("top_k"),
            seed=optional("seed"),
            stop=list(request.stop),
            session_id=request.session_id or None,
            n=1 if optional("n") is None else request.n,
            presence_penalty=optional("presence_penalty"),
            frequency_penalty=optional("frequency_penalty"),
            repetition_penalty=optional("repetition_penalty"),
            logprobs=optional("logprobs"),
            prompt_logprobs=optional("prompt_logprobs"),
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        try:
            built = self._build(request)
            deltas = await self.generation.complete(built)
            response = self._response(built[0], deltas[0])
            for choice, delta in zip(built, deltas):
                response.choices.append(
                    pb.Choice(
                        index=choice.index,
                        text=delta.text,
                        token_ids=delta.token_ids,
                        finish_reason=delta.finish_reason or "",
                        logprobs=self._logprobs(delta.logprobs),
                    )
                )
            _set_totals(response, built, deltas)
            return response
        except Exception as err:
            await _abort(context, err)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            built = self._build(request)
            by_index = {r.index: r for r in built}
            async for index, delta in self.generation.stream(built):
                response = self._response(by_index[index], delta)
                if delta.finish_reason:
                    _set_totals(response, [by_index[index]], [delta])
                yield response
        except Exception as err:
            await _abort(context, err)

    def _logprobs(self, logprobs: list[TokenLogprob]) -> list[pb.TokenLogprob]:
        return [
            pb.TokenLogprob(
                token_id=lp.token,
                token=self.text_of(lp.token),
                logprob=max(lp.logprob, MIN_LOGPROB),
                top_logprobs=[
                    pb.TopLogprob(token_id=t, token=self.text_of(t), logprob=max(v, MIN_LOGPROB))
                    for t, v in lp.top
                ],
            )
            for lp in logprobs
        ]

    def _response(self, request: GenerationRequest, delta: Delta) -> pb.GenerateResponse:
        response = pb.GenerateResponse(
            request_id=request.request_id,
            session_id=request.session_id,
            text=delta.text,
            token_ids=delta.token_ids,
            finish_reason=delta.finish_reason or "",
            index=request.index,
            logprobs=self._logprobs(delta.logprobs),
        )
        if delta.prompt_logprobs is not None:
            response.prompt_logprobs.extend(self._logprobs(delta.prompt_logprobs))
        return response


async def _abort(context: grpc.aio.ServicerContext, err: Exception) -> None:
    if isinstance(err, Overloaded):
        retry_after = (("retry-after", str(err.retry_after_s)),)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), trailing_metadata=retry_after)
    if isinstance(err, RequestError):
        message = str(err) if err.param is None or err.param in str(err) else f"{err.param}: {err}"
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
    if isinstance(err, ModelNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
    if isinstance(err, Unavailable):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
    # A bug or a failed dependency: the server's fault, never the request's.
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err!r}")


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


def _set_totals(
    response: pb.GenerateResponse, requests: list[GenerationRequest], deltas: list[Delta]
) -> None:
    """Usage (each prompt once) and speculation stats over these choices."""
    prompt = len(requests[0].prompt_ids)  # the gRPC API takes one prompt
    completion = sum(d.completion_tokens for d in deltas)
    response.usage.CopyFrom(
        pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    )
    steps = sum(d.verify_steps for d in deltas)
    accepted = sum(d.accepted_tokens for d in deltas)
    response.stats.CopyFrom(
        pb.SpeculationStats(
            verify_steps=steps,
            draft_tokens=sum(d.draft_tokens for d in deltas),
            accepted_tokens=accepted,
            tau=(accepted + steps) / steps if steps else 0.0,
        )
    )
