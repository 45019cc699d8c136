"""OpenTelemetry tracing: one trace per request, router → draft worker (per segment) → verifier (per batch).

Every role calls `configure_tracing` once in its process. With an OTLP endpoint (the config's, else
`$OTEL_EXPORTER_OTLP_ENDPOINT`) spans are batched to it; without one no SDK provider is installed,
the API's tracer stays the no-op one and every span costs nothing.

The W3C `traceparent` travels in the Ray Serve handle call's payload (router → draft worker) and in
the metadata of each session's gRPC stream (draft worker → verifier), so the three roles' spans form
one trace although they run in different processes (or pods).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from pydantic import BaseModel, ConfigDict

TRACER_NAME = "specray"
# Span attributes, one spelling for every role.
SESSION_ID = "specray.session_id"
SEGMENT_ID = "specray.segment_id"
SEGMENT_LENGTH = "specray.segment_length"
ACCEPTED = "specray.accepted"
VERIFY_BUDGET = "specray.verify_budget"
BATCH_SIZE = "specray.batch_size"
BATCH_TOKENS = "specray.batch_tokens"
ROLE = "specray.role"  # a resource attribute: router | draft_worker | verifier

_W3C = TraceContextTextMapPropagator()


class TracingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: $OTEL_EXPORTER_OTLP_ENDPOINT (the Helm chart sets it); neither: no export.
    otlp_endpoint: str | None = None
    # None: $OTEL_EXPORTER_OTLP_PROTOCOL, else grpc.
    otlp_protocol: Literal["grpc", "http/protobuf"] | None = None
    # None: $OTEL_SERVICE_NAME, else "specray".
    service_name: str | None = None

    def endpoint(self) -> str | None:
        return self.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def configure_tracing(config: TracingConfig, role: str) -> bool:
    """Install this process's tracer provider exporting over OTLP; False (and no provider) without an endpoint."""
    endpoint = config.endpoint()
    if endpoint is None:
        return False
    protocol = config.otlp_protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    service = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or "specray"
    # Resource.create also merges $OTEL_RESOURCE_ATTRIBUTES (the chart's namespace, pod, component).
    provider = TracerProvider(resource=Resource.create({"service.name": service, ROLE: role}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint, protocol)))
    trace.set_tracer_provider(provider)
    return True


def _exporter(endpoint: str, protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # An http:// endpoint means a plaintext channel, https:// TLS (the exporter reads the scheme).
        return OTLPSpanExporter(endpoint=endpoint)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        # Given explicitly, the HTTP exporter posts to the URL as is: add the signal's path.
        return HttpExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    raise ValueError(f"unsupported OTLP protocol {protocol!r} (grpc | http/protobuf)")


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(context: Context | None = None) -> dict[str, str]:
    """The W3C trace headers (`traceparent`, `tracestate`) of `context` (default: the current one)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Context | None:
    """The context a peer sent as headers or gRPC metadata; None when it sent no valid one (its
    spans are not recorded: a segment is traced only as part of its request's trace)."""
    if carrier is None:
        return None
    context = _W3C.extract(dict(carrier) if not isinstance(carrier, Mapping) else carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


@contextmanager
def span_scope(
    name: str,
    parent: Context | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
) -> Iterator[trace.Span]:
    """A span that is not made current: safe around the `yield`s of an async generator, where an
    attached context could be detached in another context. Children name it as their parent."""
    span = tracer().start_span(name, context=parent, kind=kind, attributes=attributes)
    try:
        yield span
    except Exception as err:
        span.record_exception(err)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(err)))
        raise
    finally:
        span.end()


def child_of(span: trace.Span) -> Context:
    """The context whose parent is `span`, to pass to a child span or to `inject`."""
    return trace.set_span_in_context(span)
