"""OpenTelemetry traces along a request's path: the router (the request, its tokenizing, admission and
routing), the prefill worker (queue, compute), the KV transfer and the decode worker (queue, first token,
end). Off unless an OTLP endpoint is given (`--otlp-endpoint`, chart `tracing.otlpEndpoint`): then each
process exports its spans over OTLP/HTTP in batches, a request is sampled at `--trace-ratio` (the router
decides; the workers follow its decision), and the W3C `traceparent` of the span a worker's spans hang under
travels in the internal API's messages (`traceparent` fields). Components are given a Tracer or None at
start, so with tracing off nothing on the request path calls into OpenTelemetry.

Spans are started and ended with explicit parents and times (no ambient context): many requests interleave
on one event loop, and a worker's queue and compute times come from its engine after the fact."""

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("pdserve.tracing")


class Tracer:
    def __init__(self, service: str, endpoint: str, ratio: float = 1.0, exporter: Any = None):
        """service: this process's `service.name`; endpoint: the OTLP/HTTP collector's base URL (spans go to
        {endpoint}/v1/traces); ratio: the share of new traces sampled (a worker's spans follow their parent)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"trace ratio {ratio} is not in [0, 1]")
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}),
                                       sampler=ParentBased(TraceIdRatioBased(ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self._tracer = self.provider.get_tracer("pdserve")
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = set_span_in_context
        log.warning("tracing: %s exports spans to %s (ratio %g)", service, endpoint, ratio)

    def start(self, name: str, parent: Any = None, attributes: dict | None = None, at: float | None = None) -> Any:
        """A span under parent (a span, a traceparent string, or None: a new trace); at: its start, time.time()."""
        if isinstance(parent, str):
            context = self._propagator.extract({"traceparent": parent})
        elif parent is not None:
            context = self._in_context(parent)
        else:
            context = None
        return self._tracer.start_span(name, context=context, attributes=attributes,
                                       start_time=None if at is None else int(at * 1e9))

    def end(self, span: Any, at: float | None = None, error: BaseException | str | None = None, **attributes) -> None:
        if attributes:
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, error if isinstance(error, str) else repr(error)))
        span.end(end_time=None if at is None else int(at * 1e9))

    def span(self, name: str, parent: Any, start: float, end: float, **attributes) -> None:
        """A finished span of times measured elsewhere (an engine's queue and compute)."""
        self.end(self.start(name, parent, attributes or None, at=start), at=end)

    @contextlib.contextmanager
    def child(self, parent: Any, name: str, **attributes) -> Iterator[Any]:
        span = self.start(name, parent, attributes or None)
        try:
            yield span
        except BaseException as e:
            self.end(span, error=e)
            raise
        self.end(span)

    def traceparent(self, span: Any) -> str | None:
        """The W3C traceparent a worker's spans hang under (None when the trace is not sampled)."""
        if not span.get_span_context().trace_flags.sampled:
            return None
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._in_context(span))
        return carrier.get("traceparent")

    def shutdown(self) -> None:
        """Export what is buffered (a process that stops)."""
        self.provider.shutdown()


def tracer(service: str, endpoint: str | None, ratio: float = 1.0) -> Tracer | None:
    """A process's tracer, or None when tracing is off (no endpoint)."""
    return Tracer(service, endpoint, ratio) if endpoint else None


def maybe_child(tracer: Tracer | None, parent: Any, name: str, **attributes):
    """tracer.child, or nothing when tracing is off or the request is not traced."""
    if tracer is None or parent is None:
        return contextlib.nullcontext()
    return tracer.child(parent, name, **attributes)


def now() -> float:
    return time.time()
