# Two commands do all the set-up on a machine with Python 3.11, pip and make:
#   make demo   — install, create ./nurture.db, run the demo
#   make test   — install, then lint, type-check, check the layers and run the tests
#   make bench  — scoring, then dispatch at 80 ms provider latency (docs/benchmarks.md); `make bench-quick` at 1/10 scale
#   make bench-imports — imports against a bare COPY / executemany (docs/benchmarks.md); ARGS=--quick at 100k events
#   make bench-dispatch — dispatch throughput at 80 ms provider latency, SQLite and PostgreSQL (docs/benchmarks.md)
#   make bench-report — `nurture report` over 1M emails / 5M events against a bare read (docs/benchmarks.md); ARGS=--quick at 1/10
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
# Compiled bytecode at install: every `nurture` command starts several times faster.
export UV_COMPILE_BYTECODE := 1

.PHONY: setup demo test lint typecheck bench bench-quick bench-imports bench-dispatch bench-report clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --locked
	touch $@

setup: .venv/.synced

demo: setup
	$(UV) run --locked nurture demo

lint: setup
	$(UV) run --locked ruff check .
	$(UV) run --locked ruff format --check .
	$(UV) run --locked lint-imports

typecheck: setup
	$(UV) run --locked mypy

test: lint typecheck
	$(UV) run --locked pytest

# Scoring at scale on SQLite and PostgreSQL (docs/benchmarks.md): `make bench ARGS=--quick` or `make bench-quick`.
bench: setup
	$(UV) run --locked python -m benchmarks.scoring $(ARGS)
	$(UV) run --locked python -m benchmarks.dispatch_throughput

bench-quick: setup
	$(UV) run --locked python -m benchmarks.scoring --quick $(ARGS)
	$(UV) run --locked python -m benchmarks.dispatch_throughput --messages 2000

# Imports on SQLite and PostgreSQL next to a bare bulk write (docs/benchmarks.md): `make bench-imports ARGS=--quick`.
bench-imports: setup
	$(UV) run --locked python -m benchmarks.imports $(ARGS)
# Dispatch at 80 ms provider latency against the raw sendgrid client (docs/benchmarks.md):
# `make bench-dispatch ARGS="--in-flight 256 --engine sqlite"`.
bench-dispatch: setup
	$(UV) run --locked python -m benchmarks.dispatch_throughput $(ARGS)

# `nurture report` over 1M emails and 5M events next to a bare read of them (docs/benchmarks.md):
# `make bench-report ARGS=--quick` (100k emails), ARGS="--engine sqlite".
bench-report: setup
	$(UV) run --locked python -m benchmarks.report $(ARGS)

clean:
	rm -rf $(TOOLS) .venv nurture.db nurture.db-* outbox .pytest_cache .mypy_cache .ruff_cache
