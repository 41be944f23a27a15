"""A tenant that traces with OpenTelemetry, configured the way a Django project does it: a
tracer provider set once at settings import. Spans are written as JSON lines to the file named by
TENANT_OTEL_SPANS, so that a test outside the daemon's process can read them."""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock, open(self.path, "a") as f:
            for s in spans:
                ctx, parent = s.get_span_context(), s.parent
                f.write(json.dumps({
                    "name": s.name, "kind": s.kind.name, "status": s.status.status_code.name,
                    "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
                    "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                    "attributes": dict(s.attributes or {}),
                    "links": [f"{link.context.trace_id:032x}" for link in s.links],
                }) + "\n")
        return SpanExportResult.SUCCESS


def setup(path: str) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)
