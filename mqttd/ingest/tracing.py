"""OpenTelemetry: a span per handler call, continuing the trace a publisher started (docs/operations.md, "Tracing").

Optional: with ``opentelemetry-api`` importable (the ``otel`` extra) and a tracer provider
configured by the tenant (in its settings or an ``AppConfig.ready``, as for any Django code),
each handler call runs inside a ``CONSUMER`` span named ``mqttd <route>``. A message carrying a
W3C ``traceparent`` user property (MQTT 5) is its parent; a ``batch=True`` call has one span for
the whole list, parented by its first message's trace and linked to every other message's.
Without the package, or with no provider configured (the API's proxy or no-op provider), this
costs one check per handler call.

The span lives inside the batch transaction: a handler call that raised, or that broke the
handler contract, ends its span with an error status. A message retried in the careful pass after
its batch failed gets a second span: each span is one call, as the trace should tell.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

try:  # the optional extra: nothing else in mqttd imports opentelemetry
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    _NO_PROVIDER = (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)
except ImportError:  # pragma: no cover - exercised by installs without the extra
    _trace = None  # type: ignore[assignment]

HEADERS = ("traceparent", "tracestate")


def _carrier(msg: Any) -> dict[str, str]:
    """The W3C headers among a message's MQTT 5 user properties (none on 3.1.1)."""
    props = msg.user_properties
    return {k: props[k] for k in HEADERS if k in props}


@contextlib.contextmanager
def handler_span(route: Any, msgs: Sequence[Any]) -> Iterator[None]:
    """One span around one handler call; re-raises whatever the handler raised."""
    if _trace is None or isinstance(_trace.get_tracer_provider(), _NO_PROVIDER):
        yield       # no SDK configured: no span, and the messages' properties stay unparsed
        return
    tracer = _trace.get_tracer("mqttd")
    propagator = TraceContextTextMapPropagator()
    contexts = [propagator.extract(c) for c in map(_carrier, msgs)]
    parent = contexts[0] if contexts else None
    links = []
    for ctx in contexts[1:]:
        span_ctx = _trace.get_current_span(ctx).get_span_context()
        if span_ctx.is_valid:
            links.append(_trace.Link(span_ctx))
    first = msgs[0] if msgs else None
    attributes: dict[str, Any] = {
        "messaging.system": "mqtt",
        "messaging.operation.type": "process",
        "mqttd.route": route.name,
    }
    if first is not None:
        attributes["messaging.destination.name"] = first.topic
    if len(msgs) > 1:
        attributes["messaging.batch.message_count"] = len(msgs)
    with tracer.start_as_current_span(f"mqttd {route.name}", context=parent, kind=_trace.SpanKind.CONSUMER,
                                      links=links, attributes=attributes,
                                      record_exception=True, set_status_on_exception=True) as span:
        try:
            yield
        except BaseException:
            span.set_attribute("mqttd.outcome", "failed")
            raise
        span.set_attribute("mqttd.outcome", "handled")
