"""Taking turns (ciphermq/turns.py): a busy reader steps aside for a short read, bounded.

The clocks here are fake (a turn is over when the test says so); the waits are real
Condition waits, observed through a Condition that reports when a reader starts waiting.
"""
import functools
import itertools
import socket
import threading

import pytest
from conftest import WAIT

from ciphermq.server import build_parser, config_from_args
from ciphermq.turns import SHORT_READ, Turns

BULK = SHORT_READ + 1                   # the fewest commands of a bulk read


class ReportingCondition(threading.Condition):
    """A Condition that sets ``entered`` whenever a thread starts waiting on it."""

    def __init__(self, lock):
        super().__init__(lock)
        self.entered = threading.Event()

    def wait(self, timeout=None):
        self.entered.set()
        return super().wait(timeout)


def make_turns(turn=0.001, max_wait=WAIT * 4, clock=None):
    """Turns on a clock that moves one second at every read, so every turn is over at once."""
    if clock is None:
        clock = functools.partial(next, itertools.count(0.0, 1.0))
    turns = Turns(turn, max_wait, clock=clock)
    turns.turn_ended = ReportingCondition(turns.mutex)
    return turns


def stepping_aside(turn):
    """Run turn.step_aside() in a thread; returns the thread."""
    thread = threading.Thread(target=turn.step_aside, daemon=True)
    thread.start()
    return thread


def test_a_reader_alone_never_steps_aside():
    """With no other reader busy a turn is never due, however long it lasts, and a step
    aside returns at once without counting a turn."""
    turns = make_turns()
    alone = turns.turn()
    alone.begin(1)
    assert not alone.due()
    events = turns.events
    alone.step_aside()
    assert turns.events == events and not turns.turn_ended.entered.is_set()
    alone.end()
    assert turns.short_busy == 0


@pytest.mark.parametrize("commands", [1, SHORT_READ, BULK])
def test_a_busy_reader_waits_until_a_short_read_ends(commands):
    """A reader whose turn is over while a neighbour runs a short read waits in step_aside
    until the neighbour ends its read, then starts a new turn (not marked stalled);
    whether its own read is short or bulk."""
    turns = make_turns()
    busy, neighbour = turns.turn(), turns.turn()
    neighbour.begin(SHORT_READ)
    busy.begin(commands)
    assert busy.due()
    waiter = stepping_aside(busy)
    assert turns.turn_ended.entered.wait(WAIT)
    assert waiter.is_alive(), "it waits for the neighbour"
    neighbour.end()
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert busy.stalled_at == -1, "woken by the neighbour, not by max_wait"


def test_two_short_readers_alternate_turn_by_turn():
    """Of two readers of short reads, the one stepping aside is woken when the other steps
    aside."""
    turns = make_turns()
    first, second = turns.turn(), turns.turn()
    first.begin(1)
    second.begin(1)
    waiter = stepping_aside(first)
    assert turns.turn_ended.entered.wait(WAIT)
    turns.turn_ended.entered.clear()
    other = stepping_aside(second)      # second's turn ends: first goes on
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert turns.turn_ended.entered.wait(WAIT)
    first.end()                         # first's read ends: second goes on
    other.join(WAIT)
    assert not other.is_alive()
    assert first.stalled_at == second.stalled_at == -1


def test_bulk_readers_do_not_step_aside_for_each_other():
    """Two readers of bulk reads (more than SHORT_READ commands each) are never due, and a
    step aside between them returns at once without counting a turn: they do not alternate."""
    turns = make_turns()
    first, second = turns.turn(), turns.turn()
    first.begin(BULK)
    second.begin(BULK * 100)
    assert not first.due() and not second.due()
    first.step_aside()
    second.step_aside()
    assert turns.events == 0 and not turns.turn_ended.entered.is_set()
    first.end()
    second.end()
    assert (turns.short_busy, turns.events) == (0, 0)


def test_a_bulk_reader_steps_aside_for_a_short_read_and_not_the_reverse():
    """Beside a short read's reader, a bulk reader whose turn is over is due, and the short
    read's reader is not (it does not wait for the bulk one); a read of no command (an
    unfinished line) is not counted as short."""
    turns = make_turns()
    bulk, short, nothing = turns.turn(), turns.turn(), turns.turn()
    nothing.begin(0)
    bulk.begin(BULK)
    assert not bulk.due(), "a read of no command is nobody to step aside for"
    short.begin(SHORT_READ)
    assert bulk.due()
    assert not short.due(), "the short reader does not step aside for the bulk one"
    assert turns.short_busy == 1


def test_a_blocked_neighbour_costs_one_wait_not_one_per_turn():
    """A step aside that nobody ends lasts max_wait and marks the neighbour stalled: no turn
    is due again until some reader finishes or steps aside."""
    turns = make_turns(max_wait=0.05)
    busy, blocked = turns.turn(), turns.turn()
    blocked.begin(1)
    busy.begin(BULK)
    busy.step_aside()                   # returns after max_wait: blocked never moves
    assert busy.stalled_at == turns.events
    assert not busy.due(), "the same blocked neighbour is not waited for twice"
    busy.end()
    busy.begin(BULK)                    # nor in this reader's next bulk read
    assert not busy.due(), "a bulk read's end does not count as the neighbour moving"
    blocked.end()
    blocked.begin(1)
    assert busy.due(), "once the neighbour moved, turns are taken again"


def test_turn_zero_turns_taking_turns_off():
    """With a turn of 0 readers are not counted and never due."""
    turns = make_turns(turn=0)
    first, second = turns.turn(), turns.turn()
    first.begin(1)
    second.begin(1)
    assert turns.short_busy == 0 and not first.due() and not second.due()


@pytest.mark.parametrize("fair_turn", [0.001, 0])
def test_a_connection_steps_aside_between_commands_for_a_short_read(start_server, fair_turn):
    """A connection running a read's commands while another reader runs a short read steps
    aside between two commands until that read ends (with --fair-turn 0 it never does),
    and still answers every command."""
    server = start_server(fair_turn=fair_turn, fair_max_wait=WAIT * 4)
    server.turns = turns = make_turns(turn=fair_turn)
    neighbour = turns.turn()
    neighbour.begin(1)                  # an interactive neighbour in the middle of a read
    with socket.create_connection(server.address, timeout=WAIT) as client, \
            client.makefile("rb") as replies:
        client.sendall(b"ping\n" * BULK)
        if fair_turn:
            assert turns.turn_ended.entered.wait(WAIT), "it steps aside after one ping"
            neighbour.end()
        assert [replies.readline() for _ in range(BULK)] == [b"PONG\n"] * BULK
        if not fair_turn:
            assert not turns.turn_ended.entered.is_set()
            neighbour.end()


def test_a_connection_does_not_step_aside_for_a_bulk_read(start_server):
    """A connection running a read's commands while another reader runs a bulk read (more
    than SHORT_READ commands) never steps aside for it, however its own bytes are split
    into reads, and answers every command."""
    server = start_server(fair_turn=0.001, fair_max_wait=WAIT * 4)
    server.turns = turns = make_turns(turn=0.001)
    neighbour = turns.turn()
    neighbour.begin(BULK * 100)         # a pipelining neighbour in the middle of a read
    with socket.create_connection(server.address, timeout=WAIT) as client, \
            client.makefile("rb") as replies:
        client.sendall(b"ping\n" * BULK)
        assert [replies.readline() for _ in range(BULK)] == [b"PONG\n"] * BULK
        assert not turns.turn_ended.entered.is_set(), "it never waited for the bulk reader"
    neighbour.end()


def test_fair_turn_is_parsed_and_given_to_the_servers_turns(start_server):
    """--fair-turn reaches ServerConfig.fair_turn, and the server's Turns use it (and
    fair_max_wait); a negative turn is a usage error."""
    config = config_from_args(build_parser().parse_args(["--fair-turn", "0.002"]))
    assert config.fair_turn == 0.002
    server = start_server(fair_turn=config.fair_turn, fair_max_wait=0.003)
    assert (server.turns.turn_seconds, server.turns.max_wait) == (0.002, 0.003)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--fair-turn", "-1"])
