"""Topic filters with named parameters, and a router that never makes the broker deliver twice."""
import pytest

from mqttd.errors import ConfigError
from mqttd.message import Message, PayloadError
from mqttd.router import Route, Router
from mqttd.topics import TopicFilter


def test_named_parameters_are_extracted():
    f = TopicFilter.parse("ble/{device}/telemetry")
    assert f.filter == "ble/+/telemetry"
    assert f.match("ble/dev-1/telemetry") == {"device": "dev-1"}
    assert f.match("ble/dev-1/other") is None
    assert f.match("ble/dev-1/telemetry/x") is None


def test_rest_parameter_takes_the_remaining_levels():
    f = TopicFilter.parse("logs/{path...}")
    assert f.filter == "logs/#"
    assert f.match("logs/a/b/c") == {"path": "a/b/c"}


def test_plain_wildcards_and_dollar_topics():
    assert TopicFilter.parse("a/+/c").match("a/b/c") == {}
    assert TopicFilter.parse("#").match("$SYS/broker") is None
    assert TopicFilter.parse("a/#").match("a") == {}


def test_shared_prefix_is_kept_apart():
    f = TopicFilter.parse("$share/g1/ble/{device}/telemetry")
    assert f.share_group == "g1" and f.subscription == "$share/g1/ble/+/telemetry"
    assert f.match("ble/x/telemetry") == {"device": "x"}


@pytest.mark.parametrize("bad", ["a/b#", "a/#/c", "a/{x...}/c", "a/{x}/{x}", "", "a/+b"])
def test_bad_filters_are_refused(bad):
    with pytest.raises(ConfigError):
        TopicFilter.parse(bad)


def test_covering_filters():
    c = lambda a, b: TopicFilter.parse(a).covers(TopicFilter.parse(b))  # noqa: E731
    assert c("ble/#", "ble/+/telemetry")
    assert c("ble/+/telemetry", "ble/x/telemetry")
    assert not c("ble/+/telemetry", "ble/#")
    assert c("#", "a/b")
    assert not c("a/+", "a/b/c")


def _route(pattern, qos=1, batch=False):
    return Route(TopicFilter.parse(pattern), lambda *a, **k: None, qos, batch, None, pattern)


def test_overlapping_routes_subscribe_once_and_each_route_runs():
    r = Router([_route("ble/{device}/telemetry"), _route("ble/#"), _route("other/x", qos=0)])
    assert sorted(r.subscriptions()) == [("ble/#", 1), ("other/x", 0)]
    assert len(r.match("ble/d/telemetry")) == 2


def test_qos2_routes_are_subscribed_at_qos1():
    r = Router([_route("a/b", qos=2)])
    assert r.subscriptions() == [("a/b", 1)]


def test_a_shared_group_prefixes_every_filter_but_the_canary():
    canary = Route(TopicFilter.parse("mqttd/bnp-1/canary"), lambda m: None, 1, True, None, "c", builtin=True)
    r = Router([_route("ble/+/t"), canary], share_group="bnp")
    assert sorted(r.subscriptions()) == [("$share/bnp/ble/+/t", 1), ("mqttd/bnp-1/canary", 1)]


def test_message_json_errors_are_clear():
    m = Message("t/x", b"{nope")
    with pytest.raises(PayloadError, match="t/x is not valid JSON"):
        m.json()
    with pytest.raises(PayloadError, match="not valid UTF-8"):
        Message("t/y", b"\xff\xfe").text


def test_long_dedupe_keys_are_hashed_never_truncated():
    from mqttd.ingest.dedupe import normalise

    a, b = "k" * 300 + "1", "k" * 300 + "2"
    assert normalise(a) != normalise(b)
    assert len(normalise(a)) <= 255 and normalise("short") == "short"
