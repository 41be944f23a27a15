# The two commands of the README: `make demo` and `make test`. Both set up what they need first.
.PHONY: setup demo test bench
setup:
	@scripts/setup
demo: setup
	.venv/bin/python scripts/demo
test: setup
	.venv/bin/python -m pytest -q
bench: setup
	.venv/bin/python scripts/bench
