# The two commands: `make run` (the listener on the embedded default) and `make test` (the whole suite).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test demo bench status migrate bootstrap bootstrap-test soak clean

bootstrap:
	@scripts/bootstrap.sh run

bootstrap-test:
	@scripts/bootstrap.sh test

run: bootstrap
	$(VENV)/bin/zerfaux run

demo: bootstrap
	$(VENV)/bin/zerfaux demo

status: bootstrap
	$(VENV)/bin/zerfaux status

migrate: bootstrap
	$(VENV)/bin/zerfaux migrate

test: bootstrap-test
	scripts/test.sh

bench: bootstrap-test
	$(PY) bench/dispatch.py
	$(PY) bench/inventory.py --memory
	$(PY) -m bench.replication
	$(PY) bench/schedule.py

# Ten minutes at 20 operations/s with two listeners (`make soak MINUTES=2` for a shorter run).
MINUTES ?= 10
soak: bootstrap-test
	$(PY) bench/soak.py --minutes $(MINUTES)

clean:
	rm -rf .zerfaux
