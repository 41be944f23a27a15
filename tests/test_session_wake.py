"""An idle session sleeps; an ack, a publish or room in the intake wakes it at once (issue 12.8).

The network thread used to wake every 10 ms so that acks queued by the dispatcher went out soon
(1.5% of a core per idle daemon). It now sleeps in select() up to ``reader.LOOP_BEAT_S`` and is
woken by the outbox's waker. These tests run the real Session in-process against a private
mosquitto, with a plain list as its intake (no Django, no dispatcher)."""
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from lab.waits import wait_until

from mqttd.config import BrokerConfig
from mqttd.mqtt.reader import LOOP_BEAT_S
from mqttd.mqtt.session import Session


class ListIntake(list):
    def put(self, msg) -> None:  # noqa: ANN001
        self.append(msg)


def _session(broker, intake: ListIntake, max_backlog: int = 100) -> Session:
    cfg = BrokerConfig(host="127.0.0.1", port=broker.port, keepalive=60, protocol="5")
    s = Session(cfg, f"wake-{time.monotonic_ns()}", [("wake/#", 1)], intake, max_backlog, "mqttd/wake/status")
    s.start()
    wait_until(lambda: s.state.connected, timeout=10, what="connected")
    return s


def _publisher(broker) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def test_an_idle_loop_beats_about_once_a_second_instead_of_a_hundred_times(broker):
    intake = ListIntake()
    s = _session(broker, intake)
    try:
        # Given a connected session with nothing to do, When we watch its heartbeat for 3 s
        beats = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            beats.add(s.state.loop_beat)
            time.sleep(0.005)
        # Then it iterated about once per LOOP_BEAT_S (it used to be 300 times), and still beats
        assert 2 <= len(beats) <= 3 / LOOP_BEAT_S + 2, len(beats)
    finally:
        s.stop()


def test_an_ack_queued_while_the_loop_sleeps_goes_out_at_once(broker):
    intake = ListIntake()
    s = _session(broker, intake)
    pub = _publisher(broker)
    try:
        for i in range(3):
            # Given a message received and a loop asleep again
            pub.publish(f"wake/{i}", b"x", qos=1).wait_for_publish(5)
            wait_until(lambda n=i + 1: len(intake) == n, timeout=5, what="message received")
            time.sleep(0.3)
            # When the dispatcher acks it
            msg = intake[i]
            acked_after = time.time() - msg.received_at
            s.ack([msg])
            # Then the PUBACK is written well before the next heartbeat would have sent it
            wait_until(lambda n=i + 1: len(s.ack_latencies) == n, timeout=3, what="ack written")
            assert s.ack_latencies[i] - acked_after < 0.2, (s.ack_latencies[i], acked_after)
    finally:
        pub.loop_stop()
        s.stop()


def test_a_paused_session_reads_again_as_soon_as_a_batch_is_acked(broker):
    # Given a session whose intake holds at most one message, and two messages published
    intake = ListIntake()
    s = _session(broker, intake, max_backlog=1)
    pub = _publisher(broker)
    try:
        for i in range(2):
            pub.publish(f"wake/{i}", b"x", qos=1).wait_for_publish(5)
        wait_until(lambda: len(intake) == 1 and s.state.paused_reading, timeout=5, what="paused")
        time.sleep(0.3)
        assert len(intake) == 1                       # the second waits at the broker
        # When the dispatcher takes the first and acks it
        first = intake.pop()
        t0 = time.monotonic()
        s.ack([first])
        # Then the second is read at once, not at the next heartbeat
        wait_until(lambda: len(intake) == 1, timeout=3, what="second message read")
        assert time.monotonic() - t0 < 0.5
    finally:
        pub.loop_stop()
        s.stop()


def test_stop_wakes_a_sleeping_loop(broker):
    s = _session(broker, ListIntake())
    beat = s.state.loop_beat
    wait_until(lambda: s.state.loop_beat != beat, timeout=3, interval=0.005, what="a heartbeat")
    time.sleep(0.05)                                  # the loop is asleep until the next beat
    t0 = time.monotonic()
    done = threading.Event()
    threading.Thread(target=lambda: (s.stop(timeout=5), done.set()), daemon=True).start()
    assert done.wait(5)
    # the offline status and the DISCONNECT go out at once, not after a heartbeat
    assert time.monotonic() - t0 < 0.5 and not s.thread.is_alive()
