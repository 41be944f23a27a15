"""The lab shared by the test suite and the scripts (demo, bench, soak, modelcheck, fuzz_receive):
a private mosquitto on a free port (broker), the sample tenant's databases (db), the daemon as a
subprocess (daemon), confirmed publishing (publish), waits, a private supervisord (supervisor),
network-namespace hosts (netns), private NATS and RabbitMQ clusters (clusters), the model-checking harness (model_harness), and the generators of
the receive-path fuzzer (fuzz). Not part of the mqttd package; tests put ``scripts/`` on sys.path
(tests/conftest.py)."""
