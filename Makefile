# CipherMQ — every target installs what it needs first, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 5672
HTTP_PORT ?= 15672
KEYS   ?= keys

.PHONY: install run-server test lint clean keys demo send receive certs fuzz browser-deps dashboard-screenshot

install: $(VENV)/.installed

# Re-installs when the package metadata changes; the editable install makes code edits live.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run-server: install
	$(PY) -m ciphermq.server --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT) $(ARGS)

# The receiver's key pair, made once (delete keys/*.pem to make new ones).
keys: install $(KEYS)/receiver_private.pem

$(KEYS)/receiver_private.pem:
	$(PY) bin/RSA.py --out-dir $(KEYS)

# Broker + receiver + sender end to end on a free port; prints what was received.
demo: install keys
	$(PY) bin/demo.py $(ARGS)

# Each run appends to sender_record.json: `python -m ciphermq.checker` then needs no arguments.
send: install keys
	$(PY) bin/Sender.py --host $(HOST) --port $(PORT) --record sender_record.json $(ARGS)

receive: install keys
	$(PY) bin/Receiver.py --host $(HOST) --port $(PORT) $(ARGS)

# A throwaway CA, server and client certificates for TLS (certs/, git-ignored).
certs: install
	$(PY) bin/certs.py --out-dir certs --client alice

test: install
	$(PY) -m pytest $(ARGS)

# Headless Chromium from Debian for tests/test_dashboard_browser.py (skipped without it,
# failed under CI=true).  Needs root and apt; does nothing if chromium is already there.
browser-deps:
	command -v chromium >/dev/null || { apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# docs/dashboard.png: a minute of mixed traffic, then chromium --headless --screenshot.
dashboard-screenshot: install browser-deps
	$(PY) bench/dashboard_screenshot.py --out docs/dashboard.png $(ARGS)

# 100,000 fuzzed lines beside a well-behaved client; exits 1 if a guarantee fails.
fuzz: install
	$(PY) bench/fuzz.py $(ARGS)

lint: install
	$(PY) -m pip install --quiet --disable-pip-version-check 'ruff>=0.4'
	$(VENV)/bin/ruff check ciphermq bin tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------
# Benchmarks (bench/, docs/BENCHMARKS.md) -- issues 6 and 15.  RabbitMQ and Redis Streams are
# compared when they and their client libraries are installed; a missing one is left out with
# a note in the report.
.PHONY: bench bench-quick bench-peer-install

# The full run for the record (~6 min): rewrites docs/BENCHMARKS.md and docs/benchmarks.png.
# It first tries to install the peers (RabbitMQ, Redis, their clients); where that is not possible
# (no root, no apt) it goes on and reports CipherMQ alone.
bench: install
	-$(MAKE) --no-print-directory bench-peer-install
	$(PY) bench/run.py --full --out docs/BENCHMARKS.md

# Smoke run (a few seconds per scenario, 1 repeat): prints the table, writes no report.
bench-quick: install
	$(PY) bench/run.py --quick

# The peers: Debian's rabbitmq-server and redis-server (needs root) and the `bench` extra
# (pika, redis-py, hiredis, matplotlib).  On a normal host the packages start system servers;
# RabbitMQ's takes 5672, CipherMQ's port: stop it with `systemctl disable --now
# rabbitmq-server`.  The benchmark runs a private node and a private redis-server of its own.
bench-peer-install: install
	{ test -x /usr/lib/rabbitmq/bin/rabbitmq-server && test -x /usr/bin/redis-server; } || \
	  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
	    rabbitmq-server redis-server; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
# --------------------------------------------------------------------------- end benchmarks

# ---------------------------------------------------------------------------------------
# Fault matrix and chaos demo (ciphermq/checker.py, tests/test_faults.py, bench/faults.py,
# docs/RELIABILITY.md) -- issue 4.
.PHONY: faults chaos-demo

CHAOS      ?= drop-ack=0.05,drop-confirm=0.05,drop-delivery=0.02,disconnect=0.01,delay-ms=0-20
CHAOS_SEED ?= 7

# The full matrix (10,000 messages a scenario; ~3 min): prints the table and rewrites the
# figures in docs/RELIABILITY.md.  Exit status 1 if any scenario lost or duplicated a message.
faults: install keys
	$(PY) bench/faults.py --keys $(KEYS) --out docs/RELIABILITY.md $(ARGS)

# Broker in chaos mode + receiver + 200 messages: watch the retries, redeliveries and dedup,
# then the checker's verdict.  Stops everything it started, also on Ctrl-C.
chaos-demo: install keys
	$(PY) bin/demo.py --count 200 -v --chaos $(CHAOS) --chaos-seed $(CHAOS_SEED) \
	  --broker-arg=--redelivery-interval=2 $(ARGS)
# ------------------------------------------------------------------------ end fault matrix
