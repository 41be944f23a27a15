"""mqttd's own fast tests of the message path, in-process through ``mqttd.testing`` (no broker):
how each message of a batch settles, the cases the daemon's accounting must count once each
(mqttd.ingest.stats). Run by ``manage.py test sensors`` beside the tenant's own tests.py
(tests/test_testing_api.py); the daemon-level test of the same identity is tests/test_accounting.py.
"""
from django.test import TestCase

from mqttd.django.models import DeadLetter
from mqttd.router import Route, discover, registered_routes
from mqttd.testing import deliver, deliver_many
from mqttd.topics import TopicFilter

from .models import Reading


def every_copy(msg, device):  # noqa: ANN001, ANN201 - a second, unkeyed route on the keyed topic
    Reading.objects.create(device=device, seq=msg.json()["seq"], source="every")


def fails_always(msg, device):  # noqa: ANN001, ANN201
    raise RuntimeError("second route broken")


def _with(handler, name):  # noqa: ANN001, ANN202
    discover()
    return registered_routes() + [Route(TopicFilter.parse("dedupe/{device}/telemetry"), handler, name=name)]


class SettlingTests(TestCase):
    def test_a_duplicate_whose_first_copy_failed_in_the_same_batch_runs_after_all(self):
        # Given two copies of one keyed message in one batch, the first failing (its key is not recorded)
        outs = deliver_many([("dedupe/d1/telemetry", {"seq": 5, "fail": True}), ("dedupe/d1/telemetry", {"seq": 5})])
        # Then the first is a dead letter and the second is not a duplicate: it ran, and was stored
        self.assertEqual([o.kind for o in outs], ["dead_letter", "handled"])
        self.assertEqual(Reading.objects.filter(source="dedupe", seq=5).count(), 1)

    def test_a_message_is_a_duplicate_only_when_every_route_skipped_it(self):
        routes = _with(every_copy, "tests.every_copy")
        first = deliver("dedupe/d1/telemetry", {"seq": 1}, routes=routes)
        again = deliver("dedupe/d1/telemetry", {"seq": 1}, routes=routes)
        # The keyed route skips the second copy, the unkeyed one runs it: handled, not a duplicate
        self.assertEqual((first.kind, again.kind), ("handled", "handled"))
        self.assertEqual(Reading.objects.filter(source="dedupe").count(), 1)
        self.assertEqual(Reading.objects.filter(source="every").count(), 2)

    def test_a_message_that_fails_in_one_of_its_routes_is_one_dead_letter_outcome(self):
        routes = _with(fails_always, "tests.fails_always")
        out = deliver("dedupe/d1/telemetry", {"seq": 2}, routes=routes)
        # One outcome per message (the status counts it once) and one letter row per failing route
        self.assertEqual(out.kind, "dead_letter")
        self.assertEqual(out.error, "RuntimeError: second route broken")
        self.assertEqual(list(DeadLetter.objects.values_list("route", flat=True)), ["tests.fails_always"])
        self.assertEqual(Reading.objects.filter(source="dedupe").count(), 1)   # the other route's write stays

    def test_a_payload_over_max_payload_is_set_aside_whole(self):
        out = deliver("ble/d1/telemetry", {"seq": 1, "pad": "x" * 300}, max_payload=200)
        self.assertTrue(out.dead_letter)
        self.assertTrue(out.error.startswith("PayloadTooLarge"), out.error)
        self.assertFalse(Reading.objects.exists())

    def test_a_batch_of_every_kind_settles_each_message_once(self):
        outs = deliver_many([
            ("ble/d1/telemetry", {"seq": 1}),
            ("ble/d1/telemetry", b"\xff not json"),
            ("dedupe/d2/telemetry", {"seq": 9}),
            ("dedupe/d2/telemetry", {"seq": 9}),
            ("nobody/listens", b""),
            ("bulk/d3/telemetry", {"seq": 3}),
            ("bulk/d3/telemetry", {"seq": 4, "fail": True}),      # fails the batch=True call: split, one letter
        ])
        self.assertEqual([o.kind for o in outs],
                         ["handled", "dead_letter", "handled", "duplicate", "unrouted", "handled", "dead_letter"])
        self.assertEqual(DeadLetter.objects.count(), 2)
        self.assertEqual(sorted(Reading.objects.values_list("source", "seq")),
                         [("bulk", 3), ("dedupe", 9), ("single", 1)])
