"""The sample tenant's own tests of its handlers, as a tenant writes them (docs/handlers.md,
'Testing your handlers'): a Django TestCase and ``mqttd.testing``, no broker.

Run by ``python manage.py test sensors`` (tests/test_testing_api.py does, on SQLite and PostgreSQL).
"""
from django.test import TestCase

from mqttd.django.models import DeadLetter, ProcessedKey
from mqttd.testing import deliver, deliver_many

from .models import Reading, Strict


class TelemetryHandlerTests(TestCase):
    def test_a_reading_is_stored_with_the_device_from_the_topic(self):
        out = deliver("ble/d1/telemetry", {"seq": 1, "rssi": -60, "temp": 21.5})
        self.assertTrue(out.handled, out.error)
        self.assertEqual(out.routes, ["sensors.mqtt_handlers.save_reading"])
        reading = Reading.objects.get()
        self.assertEqual((reading.device, reading.seq, reading.rssi), ("d1", 1, -60))

    def test_a_handler_that_raises_gives_a_dead_letter_with_its_error(self):
        out = deliver("ble/d1/telemetry", {"seq": 2, "fail": True})
        self.assertTrue(out.dead_letter)
        self.assertEqual(out.error, "ValueError: told to fail (seq 2)")
        self.assertIn("raise ValueError", out.traceback)
        letter = DeadLetter.objects.get()
        self.assertEqual((letter.topic, letter.error), ("ble/d1/telemetry", out.error))
        self.assertFalse(Reading.objects.exists())

    def test_bad_json_is_a_dead_letter_not_a_crash(self):
        out = deliver("ble/d1/telemetry", b"{not json")
        self.assertTrue(out.dead_letter)
        self.assertTrue(out.error.startswith("PayloadError: payload on ble/d1/telemetry is not valid JSON"), out.error)

    def test_a_redelivery_with_a_known_dedupe_key_is_skipped(self):
        first = deliver("dedupe/d1/telemetry", {"seq": 7})
        again = deliver("dedupe/d1/telemetry", {"seq": 7})
        self.assertTrue(first.handled, first.error)
        self.assertTrue(again.duplicate)
        self.assertEqual(Reading.objects.filter(source="dedupe").count(), 1)
        self.assertTrue(ProcessedKey.objects.filter(key="d1:7").exists())

    def test_a_topic_no_route_matches_is_unrouted(self):
        self.assertEqual(deliver("nobody/listens", b"x").kind, "unrouted")

    def test_dedupe_by_an_mqtt5_user_property(self):
        props = {"UserProperty": [("msg-id", "m-1")]}
        outs = [deliver("ble/d2/telemetry", {"seq": n}, dedupe_property="msg-id", **props) for n in (1, 2)]
        self.assertEqual([o.kind for o in outs], ["handled", "duplicate"])
        self.assertEqual(Reading.objects.count(), 1)


class BatchTests(TestCase):
    def test_one_bad_message_in_a_batch_does_not_roll_back_its_neighbours(self):
        # Given a batch of five with a failing message and a unique-constraint violation in it
        outs = deliver_many([
            ("ble/d1/telemetry", {"seq": 1}),
            ("ble/d1/telemetry", {"seq": 2, "fail": True}),
            ("strict/a", b""),
            ("strict/a", b""),                               # unique code: IntegrityError
            ("ble/d1/telemetry", {"seq": 3}),
        ])
        # Then the two bad ones are dead letters and the three others are stored
        self.assertEqual([o.kind for o in outs], ["handled", "dead_letter", "handled", "dead_letter", "handled"])
        self.assertIn("IntegrityError", outs[3].error)
        self.assertEqual(sorted(Reading.objects.values_list("seq", flat=True)), [1, 3])
        self.assertEqual(Strict.objects.count(), 1)
        self.assertEqual(DeadLetter.objects.count(), 2)

    def test_a_batch_route_gets_its_messages_in_one_call_and_a_duplicate_within_the_batch_is_skipped(self):
        outs = deliver_many([("bulk/d1/telemetry", {"seq": n}) for n in range(3)]
                            + [("dedupe/d2/telemetry", {"seq": 9}), ("dedupe/d2/telemetry", {"seq": 9})])
        self.assertEqual([o.kind for o in outs], ["handled"] * 4 + ["duplicate"])
        self.assertEqual(Reading.objects.filter(source="bulk").count(), 3)
        self.assertEqual(Reading.objects.filter(source="dedupe").count(), 1)
