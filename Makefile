# CipherMQ — every target installs what it needs first, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 5672
HTTP_PORT ?= 15672
KEYS   ?= keys

.PHONY: install run-server test test-slow test-all mutants lint clean keys demo send receive certs fuzz \
        browser-deps dashboard-screenshot lesson hostile

install: $(VENV)/.installed

# Re-installs when the package metadata changes; the editable install makes code edits live.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,amqp]'
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

# The quick suite (about 3 min here): everything but the tests marked `slow`, which
# setup.cfg deselects by default.  test-slow runs only those (the larger fault-matrix slice,
# 10,000 messages with 20 receiver SIGKILLs; 1-1.5 min here); test-all runs both at once.
test: install
	$(PY) -m pytest $(ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(ARGS)

test-all: install
	$(PY) -m pytest -m '' $(ARGS)

# Planted bugs, one per guarantee, each in a throwaway copy of the tree; every one must be
# caught by the tests named beside it (tests/mutants.py, docs/TESTING.md).  About 2 minutes.
mutants: install
	$(PY) tests/mutants.py $(ARGS)

# Headless Chromium from Debian for tests/test_dashboard_browser.py (skipped without it,
# failed under CI=true).  Needs root and apt; does nothing if chromium is already there.
browser-deps:
	command -v chromium >/dev/null || { apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# docs/dashboard.png: a minute of mixed traffic, then chromium --headless --screenshot.
dashboard-screenshot: install browser-deps
	$(PY) bench/dashboard_screenshot.py --out docs/dashboard.png $(ARGS)

# docs/TUTORIAL.md, one lesson at a time: make lesson N=3 (no N: the list).  ARGS='--http-port
# 15672 --hold' gives the lesson's brokers a dashboard and keeps them up until Enter.
lesson: install
	$(PY) bin/lesson.py $(N) $(ARGS)

# 100,000 fuzzed lines beside a well-behaved client; exits 1 if a guarantee fails.
fuzz: install
	$(PY) bench/fuzz.py $(ARGS)

# Each hostile-client attack beside a well-behaved client (~2.5 min): its p50/p99 and the
# broker's RSS, as a table (docs/SECURITY.md, "Hostile neighbours").
hostile: install
	$(PY) bench/hostile.py $(ARGS)

lint: install
	$(PY) -m pip install --quiet --disable-pip-version-check 'ruff>=0.4'
	$(VENV)/bin/ruff check ciphermq bin tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------
# Benchmarks (bench/, docs/BENCHMARKS.md).  RabbitMQ and Redis Streams are compared when
# they and their client libraries are installed; a missing one is left out with a note.
.PHONY: bench bench-quick bench-peer-install bench-compare

# The full run for the record (~9 min): rewrites docs/BENCHMARKS.md and docs/benchmarks.png.
# It first tries to install the peers (RabbitMQ, Redis, their clients); where that is not possible
# (no root, no apt) it goes on and reports CipherMQ alone.
bench: install
	-$(MAKE) --no-print-directory bench-peer-install
	$(PY) bench/run.py --full --out docs/BENCHMARKS.md

# Smoke run (a few seconds per scenario, 1 repeat): prints the table, writes no report.
bench-quick: install
	$(PY) bench/run.py --quick

# Before and after (issues 11, 15): the CipherMQ side of scenarios 1-5, 7, 7b, 8 against the
# broker of BASE (a temporary git worktree) and of this checkout, alternately, ROUNDS times
# each (~1 min per round); rewrites the "Before and after (issue 11)" section of OUT only.
# OUT= (empty) prints the table only.
BASE   ?= 5c2017c
ROUNDS ?= 6
OUT    ?= docs/BENCHMARKS.md

bench-compare: install
	$(PY) bench/compare.py --base $(BASE) --rounds $(ROUNDS) $(if $(OUT),--out $(OUT)) $(ARGS)

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
# docs/RELIABILITY.md).
.PHONY: faults chaos-demo

CHAOS      ?= drop-ack=0.05,drop-confirm=0.05,drop-delivery=0.02,disconnect=0.01,delay-ms=0-20
CHAOS_SEED ?= 7

# The full matrix (12 rows, 10,000 messages each; ~6 min): prints the table and rewrites the
# figures in docs/RELIABILITY.md.  Exit status 1 if any scenario lost or duplicated a message
# (or could not run: rows 9 and 12 mount a tmpfs, which needs root).
faults: install keys
	$(PY) bench/faults.py --keys $(KEYS) --out docs/RELIABILITY.md $(ARGS)

# Broker in chaos mode + receiver + 200 messages: watch the retries, redeliveries and dedup,
# then the checker's verdict.  Stops everything it started, also on Ctrl-C.
# DEMO_HTTP_PORT= (empty) runs it without the dashboard.
DEMO_HTTP_PORT ?= 15672

chaos-demo: install keys
	$(PY) bin/demo.py --count 200 -v --chaos $(CHAOS) --chaos-seed $(CHAOS_SEED) \
	  --broker-arg=--redelivery-interval=2 $(if $(DEMO_HTTP_PORT),--http-port $(DEMO_HTTP_PORT)) \
	  $(ARGS)
# ------------------------------------------------------------------------ end fault matrix

# ---------------------------------------------------------------------------------------
# RabbitMQ: the same scripts over a 3-node cluster (ciphermq/amqp.py, docs/SCALING.md).
# Debian's rabbitmq-server is installed with apt when missing (needs root).
.PHONY: cluster cluster-status cluster-stop cluster-demo rabbitmq-install

CLUSTER_DIR  ?= .cluster
CLUSTER_PORT ?= 5681

# 3 nodes on 127.0.0.1, AMQP on $(CLUSTER_PORT)..+2, own epmd, state in $(CLUSTER_DIR)/.
cluster: install rabbitmq-install
	$(PY) bin/cluster.py start --dir $(CLUSTER_DIR) --base-port $(CLUSTER_PORT) $(ARGS)

cluster-status: install
	$(PY) bin/cluster.py status --dir $(CLUSTER_DIR)

# Stops exactly the processes `make cluster` started (pids in $(CLUSTER_DIR)/cluster.json).
cluster-stop: install
	$(PY) bin/cluster.py stop --dir $(CLUSTER_DIR)

# Sender -> cluster -> Receiver, the node both use SIGKILLed mid-stream, the checker's
# verdict; then the node is started again.  Needs `make cluster` first.
cluster-demo: install keys
	$(PY) bin/cluster_demo.py --dir $(CLUSTER_DIR) --keys $(KEYS) $(ARGS)

# The package may try to start a system node on 5672 (our broker's port): where there is
# no systemd to ask, .ci/stop-system-rabbitmq stops it by its pid.
rabbitmq-install:
	@test -x /usr/lib/rabbitmq/bin/rabbitmq-server || { \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server && \
	  .ci/stop-system-rabbitmq; }
# ----------------------------------------------------------------------------- end cluster
