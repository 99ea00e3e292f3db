"""OpenTelemetry for moeserve's processes: OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set, console spans when
MOESERVE_TRACE=console, otherwise a tracer whose spans go nowhere. Trace context crosses process boundaries as
a W3C `traceparent` carrier dict (from the HTTP header or gRPC metadata, into the shards)."""
import functools
import os

TRACE_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS", "MOESERVE_TRACE")


@functools.lru_cache(maxsize=None)
def tracer():
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    exporter = None
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    elif os.environ.get("MOESERVE_TRACE") == "console":
        exporter = ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "moeserve", "process.pid": os.getpid()}))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider.get_tracer("moeserve")


def context_of(carrier: dict | None):
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    return TraceContextTextMapPropagator().extract(carrier or {})


def carrier_of(span) -> dict:
    """A carrier holding `span` as the parent for spans in another process."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    carrier: dict = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def forwarded_env() -> dict:
    """The tracing settings of this process, for the actors' runtime environment."""
    return {k: os.environ[k] for k in TRACE_ENV if k in os.environ}
