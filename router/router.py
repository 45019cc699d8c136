"""The Router deployment: the application's ingress, OpenAI-compatible HTTP (SSE) and gRPC.

HTTP arrives through Ray Serve's proxy (bound to 127.0.0.1 by the launcher); gRPC through the
replica's own server on the configured host and port.
"""

import asyncio
import time
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import AutoTokenizer

from specray.cluster.runtime import tracing
from specray.cluster.runtime.config import ClusterConfig
from specray.cluster.runtime.logs import configure_logging
from specray.cluster.runtime.session_store import SessionStore
from specray.cluster.runtime.stats_board import DRAFT_POOL, StatsBoard
from specray.router.access_log import AccessLog, GrpcAccessLog
from specray.router.auth import ApiKeyInterceptor, resolve_api_key
from specray.router.generation import (
    Generation,
    GenerationRequest,
    ModelNotFound,
    Overloaded,
    RequestError,
    Unavailable,
)
from specray.router.grpc_api import GenerationServicer, add_generation_service
from specray.router.http_guard import GuardSettings, HttpGuard
from specray.router.metrics import RouterMetrics
from specray.router.openai_responses import Responder, TokenText
from specray.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_error_body,
)
from specray.router.pool_metrics import PoolMetricsCollector
from specray.workers.models.loader import load_config

app = FastAPI(title="specray")
app.add_middleware(HttpGuard)  # API key and body size, before FastAPI reads a request
app.add_middleware(AccessLog)  # outermost: refused requests get their line too
# /health and /metrics answer within this even when Redis hangs (probes time out after a few seconds).
PROBE_TIMEOUT_S = 2.0


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error_body(err.errors()), 400)


@app.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(error_body(str(err), param=err.param), status_code=400)


@app.exception_handler(ModelNotFound)
async def _model_not_found(request: Request, err: ModelNotFound) -> JSONResponse:
    return JSONResponse(error_body(str(err), code="model_not_found", param="model"), status_code=404)


@app.exception_handler(Unavailable)
async def _unavailable(request: Request, err: Unavailable) -> JSONResponse:
    return JSONResponse(error_body(str(err), "server_error", "service_unavailable"), status_code=503)


@app.exception_handler(Overloaded)
async def _overloaded(request: Request, err: Overloaded) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after_s)}
    return JSONResponse(error_body(str(err), "rate_limit_error"), status_code=429, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # Unknown path, wrong method, a body cut off at the size limit: OpenAI's error shape too.
    kind = "server_error" if err.status_code >= 500 else "invalid_request_error"
    return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code, headers=err.headers)


@app.exception_handler(Exception)
async def _server_fault(request: Request, err: Exception) -> JSONResponse:
    # A bug or a failed dependency is the server's fault, never the request's.
    return JSONResponse(error_body(f"internal error: {err!r}", "server_error", "internal_error"), 500)


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__  # a timeout has no message


# Everything the Router uses is defined above it: `serve.ingress` takes a copy of the class and of
# the module globals its methods use when the class is defined.
@serve.deployment
@serve.ingress(app)
class Router:
    async def __init__(
        self, config: ClusterConfig, draft_workers: DeploymentHandle, verifiers: DeploymentHandle
    ):
        if config.redis_url is None:
            raise ValueError("the router needs redis_url")
        self.config = config
        configure_logging(config.log_level)
        # Created first so that __del__ finds them even when a later step fails.
        self.store = SessionStore(config.redis_url, config.session_ttl_s, config.finished_ttl_s)
        self.stats_board = StatsBoard(config.redis_url)
        api_key = resolve_api_key(config.api_key)
        HttpGuard.configure(GuardSettings(api_key, config.limits.max_body_bytes))
        self.grpc_server = grpc.aio.server(
            interceptors=[GrpcAccessLog(), *([ApiKeyInterceptor(api_key)] if api_key else [])],
            options=[("grpc.max_receive_message_length", config.limits.max_body_bytes)],
        )
        tracing.configure_tracing(config.tracing, "router")
        # The verifier pool is bound here so Serve deploys it; requests reach verifiers by the gRPC
        # addresses they register in Redis, not through this handle.
        self.verifiers = verifiers
        model_dir, model_config = load_config(config.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The context the verifiers run with: the same typed config they load (no weights read).
        max_context = model_config.max_position_embeddings
        self.metrics = RouterMetrics(config.model, config.num_speculative_tokens)
        self.pool_metrics = PoolMetricsCollector(config.model)
        self.metrics.registry.register(self.pool_metrics)
        self.generation = Generation(
            tokenizer,
            max_context,
            config.default_max_tokens,
            self.store,
            draft_workers,
            self.metrics,
            config.limits,
            config.failover,
            model=config.model,
        )
        self.token_text = TokenText(tokenizer)
        self.created = int(time.time())  # `created` of the model card
        add_generation_service(GenerationServicer(self.generation), self.grpc_server)
        if not self.grpc_server.add_insecure_port(f"{config.host}:{config.grpc_port}"):
            raise RuntimeError(f"cannot bind the gRPC API on {config.host}:{config.grpc_port}")
        await self.grpc_server.start()

    async def __del__(self) -> None:
        await self.grpc_server.stop(grace=1.0)
        await self.store.close()
        await self.stats_board.close()

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 while a verifier is registered (a dead one drops out within VERIFIER_TTL_S), else
        503; a 503 too, never a 500, when Redis cannot be read (no request could be placed)."""
        try:
            verifiers, reports = await asyncio.wait_for(
                asyncio.gather(self.store.live_verifiers(), self.stats_board.reports()), PROBE_TIMEOUT_S
            )
        except (RedisError, OSError) as err:  # OSError: the timeout
            body = {"status": "redis_unavailable", "verifiers": 0, "error": _describe(err)}
            return JSONResponse(body, 503)
        body = {
            "status": "ok" if verifiers else "no_verifier",
            "verifiers": len(verifiers),
            "draft_workers": sum(r.pool == DRAFT_POOL for r in reports),
        }
        return JSONResponse(body, 200 if verifiers else 503)

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        # This replica's counts: the whole application with the default single router; with more,
        # each scrape lands on one replica (Serve picks it). The pools' series are every replica's.
        try:
            reports = await asyncio.wait_for(self.stats_board.reports(), PROBE_TIMEOUT_S)
        except (RedisError, OSError) as err:
            # A failed scrape, not a page without the pools: Prometheus marks the target down.
            message = f"the session store is unreachable: {_describe(err)}"
            return JSONResponse(error_body(message, "service_unavailable"), 503)
        self.pool_metrics.update(reports)
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.config.model, "object": "model", "created": self.created, "owned_by": "specray"}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict[str, Any]:
        self.generation.check_model(model_id)
        return self._model_card()

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        self.generation.check_model(body.model)
        body.check()
        n = body.n or 1
        requests = self._build(
            body,
            prompts=body.prompt,
            logprobs=body.logprobs,
            # Echoed prompt tokens get their logprobs too (the first has none), as in OpenAI's API.
            prompt_logprobs=body.logprobs if body.echo else None,
            id_prefix="cmpl",
        )
        responder = Responder(
            requests,
            self.config.model,
            self.token_text,
            chat=False,
            n=n,
            logprobs=body.logprobs is not None,
            echo=bool(body.echo),
            include_usage=body.include_usage,
        )
        return await self._respond(bool(body.stream), requests, responder)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        self.generation.check_model(body.model)
        body.check()
        requests = self._build(
            body,
            messages=[m.template_dict() for m in body.messages],
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            id_prefix="chatcmpl",
        )
        responder = Responder(
            requests,
            self.config.model,
            self.token_text,
            chat=True,
            n=body.n or 1,
            logprobs=bool(body.logprobs),
            include_usage=body.include_usage,
        )
        return await self._respond(bool(body.stream), requests, responder)

    def _build(
        self, body: CompletionRequest | ChatCompletionRequest, **fields: Any
    ) -> list[GenerationRequest]:
        return self.generation.build(
            prompts=fields.pop("prompts", None),
            messages=fields.pop("messages", None),
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0) if body.top_k is not None else None,
            seed=body.seed,
            stop=body.stop_list(),
            session_id=body.session_id,
            n=body.n or 1,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            **fields,
        )

    async def _respond(self, stream: bool, requests: list[GenerationRequest], responder: Responder) -> Any:
        if not stream:
            return responder.whole(await self.generation.complete(requests))
        deltas = self.generation.stream(requests)
        # Fail before the 200 goes out: placement or an immediate verifier error becomes a 4xx/5xx.
        first = await anext(deltas)
        return StreamingResponse(responder.events(first, deltas), media_type="text/event-stream")
