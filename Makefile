# The two commands of the README: `make demo` and `make test`. Both set up what they need first.
# `make test-floor`: the message path, lock and deployment tests on the lowest version of every
# dependency pyproject.toml allows (constraints/floor.txt, in .venv-floor). `make lint`: ruff + mypy.
.PHONY: setup setup-floor demo test test-floor lint bench
FLOOR_TESTS = tests/test_message_path.py tests/test_handler_contract.py tests/test_seed_story.py \
              tests/test_typed_payloads.py tests/test_model_routes.py tests/test_tracing.py \
              tests/test_deploy.py tests/test_pahofast.py tests/test_identity.py tests/test_metrics.py
setup:
	@scripts/setup
setup-floor:
	@scripts/setup --floor
demo: setup
	.venv/bin/python scripts/demo
# Two workers, each taking whole test files (--dist loadfile): most tests wait on brokers, daemons
# and databases, so two at a time halve the wall time on two cores; each test owns its ports,
# directories and databases.
test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile
test-floor: setup-floor
	.venv-floor/bin/python -c 'import django, paho.mqtt, filelock, daemon, supervisor.options, prometheus_client, psycopg; from importlib.metadata import version as v; print("floor:", *(f"{n} {v(n)}" for n in ("Django", "paho-mqtt", "filelock", "python-daemon", "supervisor", "prometheus-client", "psycopg", "msgspec", "orjson", "pydantic", "opentelemetry-api")))'
	.venv-floor/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile $(FLOOR_TESTS)
lint: setup
	.venv/bin/ruff check mqttd
	.venv/bin/mypy
bench: setup
	.venv/bin/python scripts/bench
