"""The dead-letter screen (the Django admin of mqttd's models), driven by Django's test client.

Django can be set up only once per process and the pytest process stays free of it, so the
Django tests below run in a child process: this file run as a script (``python test_admin.py
RESULTS.json``) sets up the sample tenant (tests/tenant, ``tenant_site.settings``), runs the
``TransactionTestCase`` defined in ``_django_tests()`` with Django's test runner (a fresh test
database) and writes one result per test to RESULTS.json; each pytest test then reports one of
them. Every test logs in as a superuser through ``Client.login`` and uses the tenant's real
handlers (``ble/{device}/telemetry`` fails on {"fail": true} unless TENANT_FIXED=1;
``dedupe/{device}/telemetry`` is keyed on device+seq).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
TENANT_DIR = HERE.parent / "tenant"

DJANGO_TESTS = [
    "test_list_shows_letters_with_their_columns_and_actions",
    "test_filter_by_route_error_class_and_date_and_search_by_topic",
    "test_detail_shows_pretty_json_text_and_hex_payloads",
    "test_add_and_edit_are_refused",
    "test_replay_of_a_fixed_handler_deletes_the_letter_and_stores_the_row",
    "test_replay_that_fails_again_increments_attempts",
    "test_replay_of_a_recorded_dedupe_key_is_a_duplicate_and_runs_no_handler",
    "test_replay_of_a_letter_without_route_says_where_routes_come_from",
    "test_replay_uses_the_subscribe_routes_of_settings_mqttd_config",
    "test_replay_button_on_the_detail_page",
    "test_discard_asks_for_confirmation_then_deletes",
    "test_replay_needs_change_permission_and_discard_delete_permission",
    "test_inbox_messages_and_processed_keys_are_read_only",
]


# ---- the pytest side --------------------------------------------------------------------------

def _pg_available() -> bool:
    sys.path.insert(0, str(HERE.parent))
    from lab.db import pg_available

    return pg_available()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def django_results(request, tmp_path_factory):
    """Run the Django suite once per database in a child process; its results by test name."""
    tmp = tmp_path_factory.mktemp(f"admin-{request.param}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTTD_", "TENANT_", "PROJECT_NAME"))}
    env.update(DJANGO_SETTINGS_MODULE="tenant_site.settings", PYTHONUNBUFFERED="1")
    if request.param == "postgres":
        if not _pg_available():
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL on 127.0.0.1:5432 is required in CI")
            pytest.skip("PostgreSQL on 127.0.0.1:5432 not reachable")
        # Django's test runner creates (and drops) test_<NAME> itself.
        env.update(TENANT_DB_ENGINE="postgres", TENANT_DB_NAME=f"mqttd_admin_{uuid.uuid4().hex[:10]}")
    else:
        env.update(TENANT_DB_ENGINE="sqlite", TENANT_DB_NAME=str(tmp / "tenant.sqlite3"))
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, str(HERE), str(out)], cwd=TENANT_DIR, env=env, capture_output=True,
                          text=True, timeout=280)
    assert out.exists(), f"the Django suite did not report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def test_the_django_suite_ran_every_test(django_results):
    assert sorted(django_results) == sorted(DJANGO_TESTS)


@pytest.mark.parametrize("name", DJANGO_TESTS)
def test_admin(django_results, name):
    assert django_results.get(name) == "ok", django_results.get(name, "not run")


# ---- the Django side (child process only) ------------------------------------------------------

def _django_tests():  # noqa: C901 - one TestCase, defined after django.setup()
    import html
    import tempfile
    from datetime import timedelta
    from unittest import mock

    from django.contrib.auth.models import Permission, User
    from django.test import Client, TransactionTestCase, override_settings
    from django.urls import reverse
    from django.utils import timezone
    from sensors.models import Reading

    from mqttd.django.models import DeadLetter, InboxMessage, ProcessedKey

    SAVE_READING = "sensors.mqtt_handlers.save_reading"
    SAVE_ONCE = "sensors.mqtt_handlers.save_once"
    LIST = reverse("admin:mqttd_deadletter_changelist")

    def letter(topic: str, payload: bytes, route: str = "", error: str = "ValueError: told to fail (seq 1)",
               **kw) -> DeadLetter:
        return DeadLetter.objects.create(topic=topic, payload=payload, route=route, error=error,
                                         traceback='Traceback (most recent call last):\n  File "x.py"\n' + error,
                                         **kw)

    def page(response) -> str:
        return html.unescape(response.content.decode())

    class DeadLetterScreen(TransactionTestCase):
        def setUp(self) -> None:
            User.objects.create_superuser("root", "root@example.com", "pw-root-1")
            self.client = Client()
            self.assertTrue(self.client.login(username="root", password="pw-root-1"))

        def act(self, action: str, *ids: int, client: Client | None = None, **extra):
            data = {"action": action, "_selected_action": [str(i) for i in ids], "index": "0", **extra}
            return (client or self.client).post(LIST, data, follow=True)

        def assertIn(self, member, container, msg=None):  # noqa: N802 - a page is too long to print whole
            if member not in container:
                self.fail(msg or f"{member!r} not in {container[:3000]!r}{'...' if len(container) > 3000 else ''}")

        def assertNotIn(self, member, container, msg=None):  # noqa: N802
            if member in container:
                at = container.index(member)
                self.fail(msg or f"{member!r} unexpectedly in ...{container[max(0, at - 500):at + 500]!r}...")

        def messages_of(self, response) -> str:
            return " | ".join(str(m) for m in response.context["messages"])

        # -- the list -------------------------------------------------------------------------------
        def test_list_shows_letters_with_their_columns_and_actions(self):
            letter("ble/dev-1/telemetry", b'{"seq": 1, "fail": true}', SAVE_READING)
            letter("dedupe/dev-2/telemetry", b"\x00\xff", SAVE_ONCE, error="KeyError: 'seq'", attempts=3)
            r = self.client.get(LIST)
            self.assertEqual(r.status_code, 200)
            text = page(r)
            for expected in ("Dead letters", "ble/dev-1/telemetry", "dedupe/dev-2/telemetry", SAVE_READING,
                             "ValueError: told to fail (seq 1)", "KeyError: 'seq'", '{"seq": 1, "fail": true}',
                             "0x00ff", "Replay selected dead letters", "Discard selected dead letters",
                             "error class", "Search by topic"):
                self.assertIn(expected, text)
            self.assertNotIn("Add dead letter", text)
            self.assertNotIn(reverse("admin:mqttd_deadletter_add"), text)

        def test_filter_by_route_error_class_and_date_and_search_by_topic(self):
            a = letter("ble/dev-1/telemetry", b'{"seq": 1}', SAVE_READING)
            b = letter("dedupe/dev-2/telemetry", b'{"seq": 2}', SAVE_ONCE, error="KeyError: 'seq'")
            c = letter("bulk/dev-3/telemetry", b"{broken", "", error="ValueError: not valid JSON: ...")
            DeadLetter.objects.filter(id=c.id).update(created_at=timezone.now() - timedelta(days=40))

            def shown(query: dict) -> set[int]:
                r = self.client.get(LIST, query)
                self.assertEqual(r.status_code, 200, query)
                return {o.id for o in r.context["cl"].result_list}

            self.assertEqual(shown({}), {a.id, b.id, c.id})
            self.assertEqual(shown({"route": SAVE_ONCE}), {b.id})
            self.assertEqual(shown({"route": ""}), {c.id})
            self.assertEqual(shown({"error_class": "KeyError"}), {b.id})
            self.assertEqual(shown({"error_class": "ValueError"}), {a.id, c.id})
            today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)    # as "Today" links
            self.assertEqual(shown({"created_at__gte": str(today), "created_at__lt": str(today + timedelta(days=1))}),
                             {a.id, b.id})
            self.assertEqual(shown({"q": "dedupe/"}), {b.id})
            self.assertEqual(shown({"q": "telemetry"}), {a.id, b.id, c.id})
            self.assertEqual(shown({"q": "KeyError"}), set())        # search is by topic
            # The filter side bar offers the values there are.
            text = page(self.client.get(LIST))
            for choice in ("?error_class=KeyError", "?error_class=ValueError", f"?route={SAVE_ONCE}", "(no route)",
                           "Past 7 days"):
                self.assertIn(choice, text)

        # -- the detail view ---------------------------------------------------------------------------
        def test_detail_shows_pretty_json_text_and_hex_payloads(self):
            j = letter("ble/dev-1/telemetry", b'{"seq":1,"fail":true,"name":"caf\xc3\xa9"}', SAVE_READING,
                       properties={"user_properties": {"mqttd-seq": "7"}})
            r = self.client.get(reverse("admin:mqttd_deadletter_change", args=[j.id]))
            self.assertEqual(r.status_code, 200)
            text = page(r)
            self.assertIn('{\n  "seq": 1,\n  "fail": true,\n  "name": "café"\n}', text)
            self.assertIn("JSON, 36 bytes", text)
            for expected in ("ble/dev-1/telemetry", SAVE_READING, "ValueError: told to fail (seq 1)",
                             "Traceback (most recent call last):", "mqttd-seq", "Replay this letter"):
                self.assertIn(expected, text)

            t = letter("ble/dev-1/telemetry", b"hello, world", SAVE_READING)
            text = page(self.client.get(reverse("admin:mqttd_deadletter_change", args=[t.id])))
            self.assertIn("text, 12 bytes", text)
            self.assertIn("hello, world</pre>", text)

            h = letter("ble/dev-1/telemetry", b"\x00\x01\xfeAB" + bytes(range(16)), SAVE_READING)
            text = page(self.client.get(reverse("admin:mqttd_deadletter_change", args=[h.id])))
            self.assertIn("hex, 21 bytes", text)
            self.assertIn("00000000  00 01 fe 41 42 00 01 02 03 04 05 06 07 08 09 0a  |...AB...........|", text)
            self.assertIn("00000010  0b 0c 0d 0e 0f", text)

        def test_add_and_edit_are_refused(self):
            a = letter("ble/dev-1/telemetry", b'{"seq": 1}', SAVE_READING)
            self.assertEqual(self.client.get(reverse("admin:mqttd_deadletter_add")).status_code, 403)
            r = self.client.post(reverse("admin:mqttd_deadletter_add"),
                                 {"topic": "x/y", "payload": "", "error": "E: made up", "attempts": 1})
            self.assertEqual(r.status_code, 403)
            change = reverse("admin:mqttd_deadletter_change", args=[a.id])
            r = self.client.get(change)
            self.assertEqual(r.status_code, 200)
            text = page(r)
            self.assertIn("View dead letter", text)
            self.assertNotIn('name="topic"', text)
            self.assertNotIn('name="_save"', text)
            r = self.client.post(change, {"topic": "edited/topic", "error": "E: edited", "attempts": 99,
                                          "route": "x", "_save": "Save"})
            self.assertEqual(r.status_code, 403)
            a.refresh_from_db()
            self.assertEqual((a.topic, a.error, a.attempts), ("ble/dev-1/telemetry", "ValueError: told to fail (seq 1)",
                                                              1))
            self.assertEqual(DeadLetter.objects.count(), 1)

        # -- replay ----------------------------------------------------------------------------------------
        def test_replay_of_a_fixed_handler_deletes_the_letter_and_stores_the_row(self):
            a = letter("ble/dev-1/telemetry", b'{"seq": 11, "fail": true, "rssi": -60}', SAVE_READING)
            b = letter("ble/dev-2/telemetry", b'{"seq": 12, "fail": true}', SAVE_READING)
            keep = letter("ble/dev-3/telemetry", b'{"seq": 13, "fail": true}', SAVE_READING)
            with mock.patch.dict(os.environ, {"TENANT_FIXED": "1"}):
                r = self.act("replay_selected", a.id, b.id)
            self.assertEqual(r.status_code, 200)
            self.assertIn("Replayed 2 dead letters: handled and deleted.", self.messages_of(r))
            self.assertEqual(list(DeadLetter.objects.values_list("id", flat=True)), [keep.id])
            self.assertEqual(sorted(Reading.objects.values_list("device", "seq", "rssi")),
                             [("dev-1", 11, -60), ("dev-2", 12, None)])

        def test_replay_that_fails_again_increments_attempts(self):
            a = letter("ble/dev-1/telemetry", b'{"seq": 21, "fail": true}', SAVE_READING,
                       error="ValueError: an older error", attempts=2)
            r = self.act("replay_selected", a.id)
            msgs = self.messages_of(r)
            self.assertIn("1 dead letter failed again (attempts and error updated)", msgs)
            self.assertIn(f"#{a.id} ValueError: told to fail (seq 21) (attempts 3)", msgs)
            a.refresh_from_db()
            self.assertEqual(a.attempts, 3)
            self.assertEqual(a.error, "ValueError: told to fail (seq 21)")
            self.assertIn("told to fail", a.traceback)
            self.assertEqual(Reading.objects.count(), 0)

        def test_replay_of_a_recorded_dedupe_key_is_a_duplicate_and_runs_no_handler(self):
            ProcessedKey.objects.create(route=SAVE_ONCE, key="dev-3:5")
            dup = letter("dedupe/dev-3/telemetry", b'{"seq": 5, "rssi": -1}', SAVE_ONCE)
            new = letter("dedupe/dev-3/telemetry", b'{"seq": 6, "rssi": -2}', SAVE_ONCE)
            r = self.act("replay_selected", dup.id, new.id)
            msgs = self.messages_of(r)
            self.assertIn("Replayed 1 dead letter: handled and deleted.", msgs)
            self.assertIn("1 dead letter resolved as duplicate: the dedupe key is already recorded, so the handler "
                          "was not run; deleted.", msgs)
            self.assertFalse(DeadLetter.objects.exists())
            # The handler ran for seq 6 only, and the replay recorded its key.
            self.assertEqual(list(Reading.objects.values_list("device", "seq", "source")), [("dev-3", 6, "dedupe")])
            self.assertEqual(sorted(ProcessedKey.objects.values_list("route", "key")),
                             [(SAVE_ONCE, "dev-3:5"), (SAVE_ONCE, "dev-3:6")])

        def test_replay_of_a_letter_without_route_says_where_routes_come_from(self):
            a = letter("nowhere/dev-1", b"x", "", error="LookupError: no route")
            r = self.act("replay_selected", a.id)
            msgs = self.messages_of(r)
            self.assertIn(f"1 dead letter matched no route and stayed (attempts updated): #{a.id} nowhere/dev-1", msgs)
            self.assertIn("no mqttd config file is known to this web process", msgs)
            self.assertIn("MQTTD_CONFIG", msgs)
            a.refresh_from_db()
            self.assertEqual(a.attempts, 2)

        def test_replay_uses_the_subscribe_routes_of_settings_mqttd_config(self):
            a = letter("inbox/dev-1/raw", b"\x01\x02 raw", "mqttd.inbox", qos=1)
            with tempfile.TemporaryDirectory() as tmp:
                cfg = Path(tmp) / "tenant.toml"
                cfg.write_text('[django]\nsettings = "tenant_site.settings"\n\n[broker]\nhost = "127.0.0.1"\n\n'
                               '[[subscribe]]\ntopic = "inbox/#"\nhandler = "mqttd.inbox"\n')
                with override_settings(MQTTD_CONFIG=str(cfg)):
                    r = self.act("replay_selected", a.id)
                self.assertIn("Replayed 1 dead letter", self.messages_of(r))
                self.assertFalse(DeadLetter.objects.exists())
                self.assertEqual([(m.topic, bytes(m.payload)) for m in InboxMessage.objects.all()],
                                 [("inbox/dev-1/raw", b"\x01\x02 raw")])
                # A config that does not load: nothing is replayed, and the message says why.
                b = letter("inbox/dev-2/raw", b"x", "mqttd.inbox")
                with override_settings(MQTTD_CONFIG=str(Path(tmp) / "missing.toml")):
                    r = self.act("replay_selected", b.id)
                self.assertIn("Nothing replayed: the mqttd config does not load", self.messages_of(r))
                self.assertIn("missing.toml", self.messages_of(r))
                b.refresh_from_db()
                self.assertEqual(b.attempts, 1)

        def test_replay_button_on_the_detail_page(self):
            a = letter("ble/dev-7/telemetry", b'{"seq": 70, "fail": true}', SAVE_READING)
            text = page(self.client.get(reverse("admin:mqttd_deadletter_change", args=[a.id])))
            self.assertIn(f'formaction="{LIST}"', text)
            # What the button submits: the detail form's fields, action and the letter's id, no index.
            with mock.patch.dict(os.environ, {"TENANT_FIXED": "1"}):
                r = self.client.post(LIST, {"action": "replay_selected", "_selected_action": str(a.id)}, follow=True)
            self.assertIn("Replayed 1 dead letter", self.messages_of(r))
            self.assertFalse(DeadLetter.objects.exists())
            self.assertTrue(Reading.objects.filter(device="dev-7", seq=70).exists())

        # -- discard ----------------------------------------------------------------------------------------
        def test_discard_asks_for_confirmation_then_deletes(self):
            a = letter("ble/dev-1/telemetry", b'{"seq": 1}', SAVE_READING)
            b = letter("ble/dev-2/telemetry", b'{"seq": 2}', SAVE_READING)
            r = self.client.post(LIST, {"action": "delete_selected", "_selected_action": [str(a.id)], "index": "0"})
            self.assertEqual(r.status_code, 200)
            self.assertIn("Are you sure", page(r))
            self.assertEqual(DeadLetter.objects.count(), 2)
            r = self.client.post(LIST, {"action": "delete_selected", "_selected_action": [str(a.id)], "post": "yes"},
                                 follow=True)
            self.assertIn("Successfully deleted 1 dead letter", self.messages_of(r))
            self.assertEqual(list(DeadLetter.objects.values_list("id", flat=True)), [b.id])
            self.assertEqual(Reading.objects.count(), 0)        # discarding runs no handler

        # -- permissions ---------------------------------------------------------------------------------
        def test_replay_needs_change_permission_and_discard_delete_permission(self):
            a = letter("ble/dev-1/telemetry", b'{"seq": 31, "fail": true}', SAVE_READING)

            def staff(name: str, *codenames: str) -> Client:
                user = User.objects.create_user(name, password="pw-" + name, is_staff=True)
                user.user_permissions.set(Permission.objects.filter(content_type__app_label="mqttd",
                                                                    codename__in=codenames))
                c = Client()
                self.assertTrue(c.login(username=name, password="pw-" + name))
                return c

            viewer = staff("viewer", "view_deadletter")
            text = page(viewer.get(LIST))
            self.assertIn("ble/dev-1/telemetry", text)
            self.assertNotIn("Replay selected", text)
            self.assertNotIn("Discard selected", text)
            self.assertNotIn("Replay this letter", page(viewer.get(reverse("admin:mqttd_deadletter_change",
                                                                           args=[a.id]))))
            with mock.patch.dict(os.environ, {"TENANT_FIXED": "1"}):
                self.act("replay_selected", a.id, client=viewer)
                viewer.post(LIST, {"action": "delete_selected", "_selected_action": [str(a.id)], "post": "yes"})
            self.assertTrue(DeadLetter.objects.filter(id=a.id, attempts=1).exists())

            changer = staff("changer", "view_deadletter", "change_deadletter")
            text = page(changer.get(LIST))
            self.assertIn("Replay selected", text)
            self.assertNotIn("Discard selected", text)
            changer.post(LIST, {"action": "delete_selected", "_selected_action": [str(a.id)], "post": "yes"})
            self.assertTrue(DeadLetter.objects.filter(id=a.id).exists())
            self.assertEqual(self.act("replay_selected", a.id, client=changer).status_code, 200)
            a.refresh_from_db()
            self.assertEqual(a.attempts, 2)                      # replayed (and failed again)

            deleter = staff("deleter", "view_deadletter", "delete_deadletter")
            text = page(deleter.get(LIST))
            self.assertNotIn("Replay selected", text)
            self.assertIn("Discard selected", text)
            with mock.patch.dict(os.environ, {"TENANT_FIXED": "1"}):
                self.act("replay_selected", a.id, client=deleter)
            self.assertFalse(Reading.objects.exists())
            deleter.post(LIST, {"action": "delete_selected", "_selected_action": [str(a.id)], "post": "yes"})
            self.assertFalse(DeadLetter.objects.exists())

        # -- the other models --------------------------------------------------------------------------
        def test_inbox_messages_and_processed_keys_are_read_only(self):
            m = InboxMessage.objects.create(topic="inbox/dev-1", payload=b'{"a":[1,2]}', qos=1,
                                            received_at=timezone.now())
            r = self.client.get(reverse("admin:mqttd_inboxmessage_changelist"))
            self.assertEqual(r.status_code, 200)
            self.assertIn("inbox/dev-1", page(r))
            self.assertIn('{"a": [1, 2]}', page(r))
            detail = reverse("admin:mqttd_inboxmessage_change", args=[m.id])
            text = page(self.client.get(detail))
            self.assertIn('{\n  "a": [\n    1,\n    2\n  ]\n}', text)
            self.assertIn("View inbox message", text)
            self.assertEqual(self.client.get(reverse("admin:mqttd_inboxmessage_add")).status_code, 403)
            self.assertEqual(self.client.post(detail, {"topic": "edited", "_save": "Save"}).status_code, 403)
            m.refresh_from_db()
            self.assertEqual(m.topic, "inbox/dev-1")

            k = ProcessedKey.objects.create(route=SAVE_ONCE, key="dev-1:1")
            self.assertEqual(self.client.get(reverse("admin:mqttd_processedkey_changelist")).status_code, 200)
            self.assertEqual(self.client.get(reverse("admin:mqttd_processedkey_add")).status_code, 403)
            self.assertEqual(self.client.get(reverse("admin:mqttd_processedkey_delete", args=[k.id])).status_code,
                             403)
            key_detail = reverse("admin:mqttd_processedkey_change", args=[k.id])
            self.assertEqual(self.client.get(key_detail).status_code, 200)
            self.assertEqual(self.client.post(key_detail, {"key": "x", "_save": "Save"}).status_code, 403)
            self.assertTrue(ProcessedKey.objects.filter(key="dev-1:1").exists())

    return DeadLetterScreen


def _run_django_suite(out: Path) -> int:
    import unittest

    sys.path.insert(0, str(TENANT_DIR))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tenant_site.settings")
    import django

    django.setup()
    from django.test.runner import DiscoverRunner

    case = _django_tests()
    suite = unittest.TestSuite(case(name) for name in DJANGO_TESTS)
    extra = sorted(n for n in dir(case) if n.startswith("test_") and n not in DJANGO_TESTS)
    runner = DiscoverRunner(verbosity=2, interactive=False)
    runner.setup_test_environment()
    old = runner.setup_databases()
    try:
        result = runner.run_suite(suite)
    finally:
        runner.teardown_databases(old)
        runner.teardown_test_environment()
    results = {name: "ok" for name in DJANGO_TESTS}
    for test, trace in [*result.failures, *result.errors]:
        results[getattr(test, "_testMethodName", str(test))] = trace
    for name in extra:
        results[name] = "defined but not listed in DJANGO_TESTS"
    out.write_text(json.dumps(results, indent=1))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(_run_django_suite(Path(sys.argv[1])))
