"""A SUBSCRIBE the broker refuses is asked for again (issue 15: a freshly started NATS cluster
refused one while electing its stream leaders, and the filter stayed unsubscribed until a restart)."""
import time

from lab.daemon import write_config
from support.fakebroker import FakeBroker, connack_v5


def test_a_refused_subscription_is_asked_for_again_with_backoff_until_granted(host, sqlite_db, tmp_path):
    # Given a broker that refuses the telemetry filter twice (not authorized), then grants it
    fb = FakeBroker(connack_v5(), refuse="ble/+/telemetry", refusals=2).start()
    try:
        cfg = write_config(tmp_path / "c.toml", fb.port, protocol="5", canary_interval=3600)
        d = host.start("bnp", cfg, sqlite_db)
        d.wait_connected()
        # When the first SUBACK refuses it, the status says so (health is unhealthy on it)
        d.wait_for(lambda s: any("ble/+/telemetry" in f for f in s.get("subscribe_failures") or []),
                   what="the refusal in the status")
        # Then the daemon asks again on the same connection, after 2 s and then 4 s, and the third
        # SUBACK's grant clears the failure
        t0 = time.monotonic()
        d.wait_for(lambda s: s.get("subscribe_failures") == [] and len(_asks(fb)) >= 3, timeout=30,
                   what="the filter granted on a later SUBSCRIBE")
        assert time.monotonic() - t0 > 4, "asked again without waiting"
        assert len(fb.connects) == 1, "it reconnected instead of asking again"
        time.sleep(3)
        assert len(_asks(fb)) == 3, "it went on asking after the grant"
        assert "asking again for the refused subscriptions in 2s" in d.log()
        assert d.stop() == 0
    finally:
        fb.stop()


def _asks(fb: FakeBroker) -> list[list[str]]:
    return [f for f in fb.subscribes if "ble/+/telemetry" in f]


