"""The MQTT edge: the only package of the daemon that imports paho.

- ``client``: builds a paho client from the config (protocol, credentials, TLS), for everyone.
- ``session``: the daemon's persistent session, its network thread, generation-stamped acks.
- ``owner``: the retained owner record that proves a client-id twin.
- ``probe``: `mqttd check`'s clean-session look at the broker.
- ``pahofast``: measured speed-ups at the paho edge.

paho objects become ``mqttd.message.Message`` values here and go no further.
"""
