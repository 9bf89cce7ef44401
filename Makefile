# tuneserve: `make run` starts everything on this machine, `make test` runs the suite.
# Both install into ./.venv first (once; a stamp file makes re-runs instant).

PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.tuneserve-installed
REDIS_URL ?= $(or $(TUNESERVE_REDIS_URL),redis://127.0.0.1:6379/0)
REDIS_PORT := $(or $(lastword $(subst :, ,$(firstword $(subst /, ,$(patsubst redis://%,%,$(REDIS_URL)))))),6379)
PYTEST_ARGS ?=

.PHONY: help install run test test-fast lint browser-deps compose-deps services clean

help:
	@echo "make run          install into .venv, then start API + worker + dashboard on http://127.0.0.1:8000"
	@echo "make test         install, start what the tests need (Redis, PostgreSQL, Chromium), run pytest"
	@echo "make test-fast    the suite without tests marked slow"
	@echo "make lint         ruff (installed on demand)"
	@echo "make bench-NAME   GPU only: run bench/NAME.py (e.g. make bench-training, make bench-serving)"

install: $(STAMP)

# torch first, pinned: on hosts without an NVIDIA driver `torch==2.13.0` is the CPU build this
# machine class carries; GPU hosts keep whatever CUDA build they installed (see README).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	    echo "nvidia-smi found: keeping/using a CUDA build of torch (install it first, see README)"; \
	  else \
	    $(BIN)/pip install --disable-pip-version-check -q 'torch==2.13.0'; \
	  fi
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

run: install
	$(BIN)/tuneserve up

# Services the tests talk to. CI machines run Redis and PostgreSQL already; start them if not.
services:
	@redis-cli -u $(REDIS_URL) ping >/dev/null 2>&1 \
	  || { echo "starting redis-server on port $(REDIS_PORT)"; \
	       redis-server --daemonize yes --bind 127.0.0.1 --port $(REDIS_PORT) --save '' --appendonly no \
	         --logfile /tmp/tuneserve-redis.log || echo "warning: could not start redis-server"; sleep 1; }
	@if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then \
	    echo "starting PostgreSQL"; \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -1) main start \
	      || echo "warning: could not start PostgreSQL (its tests will skip or fail)"; \
	  fi

# Debian's Chromium for the dashboard browser tests; tolerant: those tests skip without it.
browser-deps:
	@command -v chromium >/dev/null 2>&1 \
	  || { command -v apt-get >/dev/null 2>&1 \
	       && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	       || echo "warning: chromium not installed; browser tests will skip"; }

# A Compose client for the `docker compose config` test (no engine needed). Debian ships v1 as
# docker-compose; tolerant: the test skips without one.
compose-deps:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 \
	  || { command -v apt-get >/dev/null 2>&1 \
	       && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } \
	       || echo "warning: no Docker Compose client; the compose config test will skip"; }

test: install services browser-deps compose-deps
	$(BIN)/pytest -q -ra --durations=15 $(PYTEST_ARGS)

test-fast: install services
	$(BIN)/pytest -q -ra -m 'not slow' $(PYTEST_ARGS)

lint: install
	@test -x $(BIN)/ruff || $(BIN)/pip install -q ruff
	$(BIN)/ruff check service workers api_tests

# GPU-only benchmarks: `make bench-NAME` runs bench/NAME.py (e.g. bench-training, bench-serving) and
# refuses on hosts without an NVIDIA GPU: the CPU numbers would mean nothing.
bench-%:
	@command -v nvidia-smi >/dev/null 2>&1 || { echo "make bench-$*: GPU only (no nvidia-smi on this host)"; exit 1; }
	@test -f bench/$*.py || { echo "make bench-$*: no bench/$*.py"; exit 1; }
	@$(MAKE) --no-print-directory install
	$(BIN)/python bench/$*.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
