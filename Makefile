# The two commands of the README: `make demo` and `make test` (setup runs first, idempotently).
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: setup demo test lint down

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/plexus lab demo

down:
	$(VENV)/plexus lab down

lint: setup
	$(VENV)/ruff check .
	$(VENV)/lint-imports
	$(VENV)/mypy

test: setup
	$(VENV)/ruff check .
	$(VENV)/pytest $(PYTEST_ARGS)
