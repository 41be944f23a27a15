"""Topic filter -> handler. Pure data and matching; no I/O.

Routes come from ``@route`` decorators in the ``mqtt_handlers`` module of each installed Django
app (collected by ``discover``) and from ``[[subscribe]]`` tables in the config. The broker is
asked only for a covering set of filters, so overlapping routes never make it deliver a message
twice; each message is then matched here against every route and runs each matching one once.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mqttd.config import Subscription
from mqttd.errors import ConfigError
from mqttd.ingest.typed import Payload, payload_param
from mqttd.message import Message
from mqttd.topics import TopicFilter

log = logging.getLogger("mqttd.router")

Handler = Callable[..., Any]
DedupeFn = Callable[[Message], "str | None"]


@dataclass(frozen=True)
class Route:
    topic: TopicFilter
    handler: Handler
    qos: int = 1
    batch: bool = False
    dedupe: DedupeFn | None = None
    name: str = ""                    # stable id: "module.function" (used for dead letters and dedupe keys)
    builtin: bool = False
    payload: Payload | None = None    # the typed payload parameter (mqttd.ingest.typed), or a model route's rows

    def invoke(self, msgs: list[Message]) -> Any:
        """Call the handler the way it is declared: the list for a ``batch=True`` route, else the
        one message with its topic parameters as keyword arguments; a typed payload as the
        keyword argument its parameter names (a list aligned with ``msgs`` for a batch)."""
        p = self.payload
        if self.batch:
            if p is None:
                return self.handler(msgs)
            return self.handler(msgs, **{p.param: [p.value(m) for m in msgs]})
        msg = msgs[0]
        if p is None:
            return self.handler(msg, **msg.params)
        return self.handler(msg, **msg.params, **{p.param: p.value(msg)})

    @property
    def subscribe_qos(self) -> int:
        """QoS 2 is subscribed as 1: paho loses QoS 2 receive state when the process dies."""
        return min(self.qos, 1)


_registry: list[Route] = []


def _handler_name(fn: Handler) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def route(topic: str, qos: int = 1, batch: bool = False, dedupe: DedupeFn | None = None) -> Callable[[Handler], Handler]:
    """Register ``fn`` for ``topic``; ``{name}`` is one level, ``{name...}`` the rest (docs/handlers.md)."""
    if qos not in (0, 1, 2):
        raise ConfigError(f"@route({topic!r}): qos must be 0, 1 or 2, not {qos!r}")
    tf = TopicFilter.parse(topic)

    def register(fn: Handler) -> Handler:
        name = _handler_name(fn)
        payload = payload_param(fn, batch, name, frozenset(n for n in tf.names if n))
        if not batch:
            _check_params(fn, tf)
        _registry.append(Route(tf, fn, qos, batch, dedupe, name, payload=payload))
        return fn

    return register


def _check_params(fn: Handler, tf: TopicFilter) -> None:
    """A per-message handler must accept every named parameter of its filter."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    missing = [n for n in tf.names if n and n not in sig.parameters]
    if missing:
        raise ConfigError(f"handler {_handler_name(fn)} for {tf.pattern!r} does not accept parameter(s) {', '.join(missing)}")


def registered_routes() -> list[Route]:
    return list(_registry)


def clear_registry() -> None:
    """For tests and for `replay`, which builds its router afresh."""
    _registry.clear()


def discover() -> None:
    """Import the ``mqtt_handlers`` module of every installed Django app (Django must be set up)."""
    from django.utils.module_loading import autodiscover_modules

    autodiscover_modules("mqtt_handlers")


def resolve_handler(path: str, where: str) -> Handler:
    if path == "mqttd.inbox":
        from mqttd.django.inbox import inbox

        return inbox
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"handler {path!r} is not a dotted path (module.function)", key=where)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import handler module {module_name!r}: {exc}", key=where) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}", key=where)
    return fn


def routes_from_config(subs: Iterable[Subscription], file: str | None = None) -> list[Route]:
    """Routes of the ``[[subscribe]]`` tables: a handler, or a model and its fields (a model route,
    mqttd.ingest.modelroute; Django must be set up). Every error names the file and the key."""
    routes = []
    for i, sub in enumerate(subs):
        tf = TopicFilter.parse(sub.topic)
        dedupe = None
        if sub.dedupe is not None:
            from mqttd.ingest.modelroute import dedupe_key

            dedupe = dedupe_key(sub.dedupe, tf, file, f"subscribe[{i}].dedupe")
        if sub.model is not None:
            from mqttd.ingest.modelroute import model_route

            handler, rows = model_route(sub.model, sub.fields, tf, file, f"subscribe[{i}]")
            # The name (dead letters, dedupe keys) says the model and the topic: two routes may fill one model.
            routes.append(Route(tf, handler, sub.qos, True, dedupe, f"model:{sub.model}:{sub.topic}", payload=rows))
            continue
        assert sub.handler is not None     # config: handler or model
        where = f"{file + ': ' if file else ''}subscribe[{i}].handler"
        fn = resolve_handler(sub.handler, where)
        batch = sub.batch or getattr(fn, "mqttd_batch", False)
        try:
            payload = payload_param(fn, batch, sub.handler, frozenset(n for n in tf.names if n))
        except ConfigError as exc:
            raise ConfigError(exc.reason, key=where) from None
        if not batch:
            _check_params(fn, tf)
        routes.append(Route(tf, fn, sub.qos, batch, dedupe, sub.handler, payload=payload))
    return routes


@dataclass
class Router:
    routes: list[Route]
    share_group: str | None = None
    _cache: dict[str, list[tuple[Route, dict[str, str]]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for r in self.routes:
            if r.qos == 2:
                log.warning("route %s asks for QoS 2 on %s: subscribing at QoS 1 (paho loses QoS 2 state "
                            "when the process dies; mqttd acks after commit instead)", r.name, r.topic.pattern)

    def match(self, topic: str) -> list[tuple[Route, dict[str, str]]]:
        """Every route matching ``topic`` with its params. Cached: device topics repeat."""
        hit = self._cache.get(topic)
        if hit is None:
            hit = [(r, p) for r in self.routes if (p := r.topic.match(topic)) is not None]
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[topic] = hit
        return hit

    def subscriptions(self) -> list[tuple[str, int]]:
        """The covering set of (subscription string, qos) to send to the broker."""
        by_group: dict[str | None, list[tuple[TopicFilter, int]]] = {}
        for r in self.routes:
            # A builtin route (the canary) is shared only through a group of its own, if at all.
            group = r.topic.share_group if r.builtin else (r.topic.share_group or self.share_group)
            by_group.setdefault(group, []).append((r.topic, r.subscribe_qos))
        result: list[tuple[str, int]] = []
        for group, items in by_group.items():
            kept: list[tuple[TopicFilter, int]] = []
            for tf, qos in items:
                if any(k.covers(tf) for k, _ in kept):
                    kept = [(k, max(q, qos) if k.covers(tf) else q) for k, q in kept]
                    continue
                merged_qos = max([qos] + [q for k, q in kept if tf.covers(k)])
                kept = [(k, q) for k, q in kept if not tf.covers(k)] + [(tf, merged_qos)]
            for tf, qos in kept:
                sub = f"$share/{group}/{tf.filter}" if group else tf.filter
                if (sub, qos) not in result:
                    result.append((sub, qos))
        return result

    def describe(self) -> list[str]:
        return [f"{r.topic.pattern} -> {r.name}{' (batch)' if r.batch else ''} qos={r.qos}"
                f"{f' payload: {r.payload.kind}' if r.payload else ''}{' dedupe' if r.dedupe else ''}"
                for r in self.routes]
