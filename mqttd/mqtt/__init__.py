"""The MQTT edge: the only package of the daemon that imports paho.

- ``client``: builds a paho client from the config (protocol, credentials, TLS), for everyone.
- ``session``: the daemon's persistent session and its network thread (the one owner of paho),
  split by concern: ``callbacks`` (paho's, on that thread), ``connector`` (nodes of
  broker.hosts, backoff, each attempt up to CONNACK), ``reader`` (select() and flow control:
  asleep while idle), ``outbox`` (generation-stamped acks and publishes from other threads, and
  the waker), ``subscriptions`` (the routed filters and the remembered ones), ``grants`` (the
  CONNACK honoured), ``state`` (what status and watchdog read), ``faults`` (the test-only fault
  hooks).
- ``owner``: the retained owner record that proves a client-id twin.
- ``probe``: `mqttd check`'s clean-session look at the broker; ``findings``: what it found, and
  the known caveats of that broker.
- ``pahofast``: measured speed-ups at the paho edge; ``decode``: the pure packet decoders it
  installs.
- ``outbound`` (+ ``pipeline``, ``confirm``, ``stamp``, ``outfast``): the tenant publisher's
  connection, its backlog and window, its confirms, the gap-detection stamp and its measured
  speed-ups (``mqttd.publisher`` is the API over it).

paho objects become ``mqttd.message.Message`` values here and go no further.
"""
