"""The tenant's tests of its tracing (the `otel` extra), with the OpenTelemetry SDK's in-memory
exporter and ``mqttd.testing``: a message carrying a W3C ``traceparent`` continues its trace with
one span per handler call. Run by ``manage.py test sensors.tracing_tests`` (tests/test_tracing.py);
not named test*.py so that ``manage.py test sensors`` leaves it to that run."""
from django.test import TestCase
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mqttd.testing import deliver, deliver_many

EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_provider)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def traceparent(trace_id: str = TRACE, span_id: str = PARENT) -> list[tuple[str, str]]:
    return [("traceparent", f"00-{trace_id}-{span_id}-01")]


class TracingTests(TestCase):
    def setUp(self):
        EXPORTER.clear()

    def test_a_traced_message_continues_its_trace_with_one_consumer_span(self):
        out = deliver("ble/d1/telemetry", {"seq": 1, "rssi": -60}, UserProperty=traceparent())
        self.assertTrue(out.handled, out.error)
        [span] = EXPORTER.get_finished_spans()
        self.assertEqual(span.name, "mqttd sensors.mqtt_handlers.save_reading")
        self.assertEqual(span.kind, SpanKind.CONSUMER)
        self.assertEqual(f"{span.context.trace_id:032x}", TRACE)
        self.assertEqual(f"{span.parent.span_id:016x}", PARENT)
        self.assertEqual(span.attributes["messaging.destination.name"], "ble/d1/telemetry")
        self.assertEqual(span.attributes["mqttd.route"], "sensors.mqtt_handlers.save_reading")
        self.assertEqual(span.attributes["mqttd.outcome"], "handled")

    def test_a_handler_that_raises_ends_its_span_with_an_error(self):
        out = deliver("ble/d1/telemetry", {"seq": 2, "fail": True}, UserProperty=traceparent())
        self.assertTrue(out.dead_letter)
        # (the batch's optimistic pass and the careful pass that isolates the bad message each
        # call the handler: one span per call, every one of them an error in the same trace)
        spans = EXPORTER.get_finished_spans()
        self.assertGreaterEqual(len(spans), 1)
        for span in spans:
            self.assertEqual(f"{span.context.trace_id:032x}", TRACE)
            self.assertEqual(span.status.status_code, StatusCode.ERROR)
            self.assertEqual(span.attributes["mqttd.outcome"], "failed")
            self.assertEqual(span.events[0].name, "exception")
            self.assertIn("told to fail", span.events[0].attributes["exception.message"])

    def test_an_untraced_message_starts_a_new_trace(self):
        deliver("ble/d1/telemetry", {"seq": 3})
        [span] = EXPORTER.get_finished_spans()
        self.assertIsNone(span.parent)

    def test_a_batch_call_is_one_span_linked_to_every_message_trace(self):
        other = "0af7651916cd43dd8448eb211c80319c"
        outs = deliver_many([("bulk/d1/telemetry", {"seq": 4}, {"UserProperty": traceparent()}),
                             ("bulk/d1/telemetry", {"seq": 5}, {"UserProperty": traceparent(other, "b7ad6b7169203331")})])
        self.assertTrue(all(o.handled for o in outs), outs)
        [span] = EXPORTER.get_finished_spans()
        self.assertEqual(f"{span.context.trace_id:032x}", TRACE)
        self.assertEqual([f"{link.context.trace_id:032x}" for link in span.links], [other])
        self.assertEqual(span.attributes["messaging.batch.message_count"], 2)
