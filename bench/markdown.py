"""docs/BENCHMARKS.md: the table, the harness's ceiling, chart, machine, commands, method.

The "## Profile and gaps" section is written by people: ``write`` carries it over from the
file it replaces (or leaves a placeholder), so ``make bench`` can be run again at any time.
Everything after it is carried over too: bench/compare.py keeps its "## Before and after
(issue 11)" section there.
"""
import datetime
import os

import chart
from e2e import KEY_REUSE
from table import number

PROFILE_HEADING = "## Profile and gaps"
PROFILE_PLACEHOLDER = """\
_To be filled in by the lead: the profile (py-spy or cProfile) of the scenarios that miss
their target, and what explains each gap. `make bench` keeps this section when it rewrites
the file._
"""
CHART_NAME = "benchmarks.png"

TEMPLATE = """\
# Benchmarks: CipherMQ side by side with RabbitMQ and Redis Streams

* Run: `{command}` on {date}, {minutes:.1f} min in all.
* Mode: {mode}, {repeats} repeat(s) per scenario and side.
* CipherMQ: {m[ciphermq]}.
* Peer: {peer}.
* Second peer: {redis_peer}.

`make bench` rewrites everything here but the "Profile and gaps" section and what follows it
(`make bench-compare` writes "Before and after (issue 11)" there). The raw runs are in
`bench/results/` (not committed).

## Results

Targets met: **{met} of {judged} judged**, {targets} targets in all.

{table}

↑ higher is better, ↓ lower is better. Each ratio is CipherMQ's median divided by the peer's:
above 1 is a win on ↑ rows, below 1 a win on ↓ rows. Targets are judged against RabbitMQ;
the Redis Streams columns are there to compare. Spreads are the lowest and highest of the
repeats. The brokers ran alternately, run by run, on the same machine: compare medians
within one report only.
{failures}
### The harness's own ceiling

The same client processes against `bench/relay.py`, a trivial threaded Python relay that
keeps no promise at all (no validation, dedup, prefetch or redelivery). It shows what these
clients reach when the broker costs almost nothing; where CipherMQ comes close to it, the
clients and the machine, not the broker, set the pace.

{calibration}

## Chart

{chart}

## Machine

| | |
|---|---|
| CPUs | {m[cpus]} |
| CPU model | {m[cpu_model]} |
| RAM | {m[ram]} |
| OS, kernel | {m[os]}, Linux {m[kernel]} |
| Python | {m[python]} |
| CipherMQ | {m[ciphermq]} |
| RabbitMQ | {rabbitmq} |
| Redis | {redis} |
| pycryptodome | {m[pycryptodome]} |
| temp dir (journals, Mnesia) | {m[tmp_filesystem]} |
| load average (1, 5, 15 min) at the start / end | {m[load_average]} / {load_at_end} |

Two cores carry the broker, every client process and, in peer mode, the idle RabbitMQ node
and redis-server during the other brokers' runs. Other work on the machine (a load average
above ~1 before the run) shows up as spread and hits every broker alike, run by run.

## Commands

```sh
make bench               # this report: $(PY) bench/run.py --full --out docs/BENCHMARKS.md
make bench-quick         # smoke run, prints the table only: $(PY) bench/run.py --quick
make bench-peer-install  # as root: apt-get install rabbitmq-server redis-server; the bench extra
make bench-compare       # before/after: the broker of 5c2017c against this one, section below
make bench-compare BASE=<commit> ROUNDS=10 OUT=   # another base, more rounds, print only
python bench/run.py --only 1,4 --repeats 5 --no-peer   # a few scenarios, CipherMQ alone
python bench/run.py --only 3 --peers redis             # one scenario, CipherMQ and Redis
```

This report: `{command}`. The brokers under test, one fresh process per run:

```sh
python -m ciphermq.server --port <free port> --log-level WARNING                   # 1-5, 8
python -m ciphermq.server --port <free port> --log-level WARNING --data-dir <tmp>  # 7, 7b
```

Scenario 6 runs the real scripts, with fresh keys from `bin/RSA.py` in a temporary directory:

```sh
python bin/Receiver.py --port P --max-messages N --private-key K --output F
python bin/Sender.py --port P --count N --key-reuse {{1|{key_reuse}}} --public-key K.pub --outbox F
```

## How each figure is measured

* **Envelopes**: 537-byte JSON objects with the five string fields (`message_id`,
  `enc_session_key`, `nonce`, `tag`, `ciphertext`, sized like a real v2 envelope) and a
  fixed-width `sent_at` stamp, built before the clock starts. Ids carry a fresh token per run
  (CipherMQ re-ACKs an id it already knows without delivering it again). RabbitMQ gets the
  same bytes as the body of a message to the default exchange; Redis gets them as the one
  field of a stream entry.
* **Processes**: each broker and each client is a process of its own on 127.0.0.1; the
  clients report ready (connected, subscribed, envelopes built) and start on one event.
* **Throughput (1, 2, 3, 7)**: {msgs} messages per run; msg/s from the first publish to the
  consumer's last `ACK_CONFIRMED` (RabbitMQ: its last `basic.ack`, which has no reply).
  Publishers keep 2,000 publishes unconfirmed (1 in scenario 3); the consumer has prefetch
  2,000 and acks every message. CipherMQ's clients are raw sockets with newline framing from
  a buffer and one `sendall` per batch; RabbitMQ's are pika `SelectConnection`s with
  publisher confirms; Redis's are redis-py (with hiredis) clients: the publisher pipelines
  2,000 `XADD`s at a time (redis-py has no sliding window), the consumer reads up to 2,000
  entries per `XREADGROUP` of a consumer group and sends one `XACK` per entry, the acks of
  one read pipelined. An `XADD` reply is Redis's publish confirm.
* **Client libraries (9, 9b)**: the same run as 1 and 3 with the libraries a user would
  call on both ends: `ciphermq.client` (what `Sender.py` and `Receiver.py` use:
  `publish_many` filling a window of 2,000 and `Reply.result` on the oldest, or
  `Client.publish` blocking for each ACK; the consumer acks every delivery with its own
  `ack` line, all that have arrived in one `ack_many` write), pika as above, redis-py as
  above. Scenario 9's target is 2× pika+RabbitMQ.
* **7b**: the same publisher with nobody consuming, so every confirm waits for the disk on
  both sides. RabbitMQ may skip the write for a message a consumer has already acked, which
  favours it in 7; 7b is the like-for-like comparison of durability. Redis runs 7 and 7b on
  a fresh server with `appendonly yes` and `appendfsync always` (the append-only file is
  fsynced before each reply; one fsync may cover a whole pipeline).
* **Latency (4, 8)**: {latency_seconds:.0f} s at 1,000 msg/s, each publish waiting for its
  ACK or confirm. The stamp is `time.monotonic()` just before the write; the consumer
  subtracts it from `time.monotonic()` when the read that brought the message returns
  (CLOCK_MONOTONIC is one clock for every process on Linux). The same method on both sides.
  In 8, 1,000 connections (4 processes × 250) are opened first and held: raw TCP after one
  `ping`/`PONG` for CipherMQ, full AMQP handshakes for RabbitMQ, raw TCP after one
  `PING`/`+PONG` for Redis.
* **RSS (5)**: {queued_msgs} messages published pipelined to a fresh broker with no consumer;
  `VmRSS` of the broker process (beam.smp for RabbitMQ, redis-server for Redis: a stream
  with a consumer group and no reader) right after the last ACK.
* **Crypto (6)**: the bound is RSA-OAEP-2048 (SHA-256) decrypts per second in one process
  doing nothing else. 6a/6b send {e2e_rsa_msgs} / {e2e_reuse_msgs} messages through
  `Sender.py` → broker → `Receiver.py` (decrypt, append, fsync, ack) with the scripts'
  default window, prefetch and ack batch. The rate runs from the receiver's first `Received`
  line to its final `saved` line, printed after its last `ACK_CONFIRMED`. The raw runs also
  hold `wall_msg_per_s`, timed from the sender's start, which includes its sealing of every
  message into its outbox before the first publish.
* **Ceiling (0a, 0b)**: the throughput clients against `bench/relay.py`.

<details><summary>Every run</summary>

| # | figure | CipherMQ runs | RabbitMQ runs | Redis runs |
|---|---|---|---|---|
{raw_runs}

</details>

{profile}"""


def _results_table(lines):
    header = ("| # | scenario | figure | CipherMQ median [min–max] "
              "| RabbitMQ median [min–max] | ours / RabbitMQ "
              "| Redis median [min–max] | ours / Redis | target | met? |")
    rows = [header, "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    rows += [f"| {line.number} | {line.title} | {line.label} {line.arrow} | {line.ours_cell()} "
             f"| {line.rabbit_cell()} | {line.ratio_cell()} "
             f"| {line.redis_cell()} | {line.redis_ratio_cell()} | {line.target or ''} "
             f"| {line.verdict()} |" for line in lines if not line.calibration]
    return "\n".join(rows)


def _calibration_table(lines):
    rows = ["| # | the same clients against `bench/relay.py` | msg/s median [min–max] |",
            "|---|---|---:|"]
    rows += [f"| {line.number} | {line.title.split(', ')[-1]} | {line.ours_cell()} |"
             for line in lines if line.calibration]
    return "\n".join(rows)


def _raw_runs(lines):
    def runs(summary):
        return ", ".join(number(value) for value in summary.values) if summary else "–"
    return "\n".join(f"| {line.number} | {line.label} | {runs(line.ours)} | {runs(line.rabbit)} "
                     f"| {runs(line.redis)} |" for line in lines)


def _failures(lines):
    seen = []
    for line in lines:
        for error in line.errors:
            item = f"* {line.number} ({line.title}): {error.splitlines()[0]}"
            if item not in seen:
                seen.append(item)
    return "\nFailed runs (not in the medians):\n\n" + "\n".join(seen) + "\n" if seen else ""


def _previous_profile(path):
    """The "Profile and gaps" section of the report at ``path`` and everything after it, or
    None."""
    try:
        with open(path, encoding="utf-8") as previous:
            text = previous.read()
    except OSError:
        return None
    at = text.find("\n" + PROFILE_HEADING)
    return text[at + 1:].rstrip() + "\n" if at >= 0 else None


def write(path, lines, context):
    """Write the report to ``path`` and the chart beside it (or a note why there is none)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    chart_path = os.path.join(directory, CHART_NAME)
    no_chart = chart.draw(chart_path, lines)
    m = context["machine"]
    sizes = context["sizes"]
    judged = [line for line in lines if line.met is not None]
    if context["peer"]:
        peer = (f"RabbitMQ {m['rabbitmq']} (Erlang {m['erlang']}) through pika {m['pika']}, "
                "a private node on loopback started by the harness")
    else:
        peer = f"**no RabbitMQ comparison in this run**: {context['peer_note']}"
    if context.get("redis"):
        redis_peer = (f"Redis {m['redis']} (Streams) through redis-py {m['redis_py']}"
                      f"{' with hiredis ' + m['hiredis'] if m['hiredis'] else ''}, "
                      "a private redis-server on loopback started by the harness")
    else:
        redis_peer = f"**no Redis comparison in this run**: {context.get('redis_note')}"
    text = TEMPLATE.format(
        command=" ".join(context["argv"]),
        date=datetime.datetime.fromisoformat(context["started_at"]).strftime(
            "%Y-%m-%d %H:%M %Z"),
        mode=context["mode"], repeats=context["repeats"], minutes=context["elapsed_s"] / 60,
        peer=peer, redis_peer=redis_peer,
        redis=(f"{m['redis']}, redis-py {m['redis_py']}, hiredis {m['hiredis']}"
               if m.get("redis") else "not installed"),
        met=sum(1 for line in judged if line.met), judged=len(judged),
        targets=sum(1 for line in lines if line.target),
        table=_results_table(lines), failures=_failures(lines),
        calibration=_calibration_table(lines),
        chart=(f"![CipherMQ and RabbitMQ, medians with min–max]({CHART_NAME})"
               if no_chart is None else f"_No chart: {no_chart}._"),
        m=m, load_at_end=context["load_at_end"],
        rabbitmq=(f"{m['rabbitmq']}, Erlang {m['erlang']}, pika {m['pika']}"
                  if m["rabbitmq"] else "not installed"),
        key_reuse=KEY_REUSE,
        msgs=f"{sizes['msgs']:,}", latency_seconds=sizes["latency_seconds"],
        queued_msgs=f"{sizes['queued_msgs']:,}", e2e_rsa_msgs=f"{sizes['e2e_rsa_msgs']:,}",
        e2e_reuse_msgs=f"{sizes['e2e_reuse_msgs']:,}",
        raw_runs=_raw_runs(lines),
        profile=_previous_profile(path) or PROFILE_HEADING + "\n\n" + PROFILE_PLACEHOLDER)
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)
