"""Taking turns: a connection busy with a long read steps aside for an interactive neighbour.

Every connection's reader runs the commands of one read (up to 256 KiB of lines) in a
row, and the two things it needs are not handed out fairly:

* the broker mutex is a plain lock.  A reader that releases it and takes it again a few
  microseconds later, for its next command, nearly always beats a neighbour that was woken
  to take it (that thread is still being scheduled), so a neighbour's one publish can wait
  for all 500 commands of an attacker's pipelined write;
* the interpreter lock is taken from a running thread only every switch interval
  (``--switch-interval``).

So readers take turns, as processes do on an Erlang VM, whose scheduler lets each one run
a budget of reductions and then the next.  What the turns protect is an interactive
neighbour: a client that sends a command and waits for its reply (the Sender's lock-step
publish, a consumer acking each delivery), so that each of its reads holds one command or
a few.  A read of at most ``SHORT_READ`` commands is **short**; ``Turns`` counts the
readers running the commands of a short read ("short busy").  A reader that has run
commands for longer than ``turn`` seconds while a short reader other than itself is busy
steps aside between two commands: it waits until some short reader finishes its read or
some reader steps aside, at most ``max_wait`` seconds, and then goes on with a new turn.
A well-behaved neighbour's command thus waits about one turn.

A reader never steps aside for a **bulk** read (more than ``SHORT_READ`` commands): two
pipelining clients, say a publisher and its consumer's acks, gain nothing from
alternating every turn, and did pay for it: a wait and a wake-up per turn, 50-150 steps
aside and 40-230 ms of waiting per connection in a 1.5 s run of ``make bench``'s scenario
1 (docs/BENCHMARKS.md, "Profile and gaps"); none now.  Two bulk readers share the CPU as
any two threads do, by the interpreter's switch interval, and a command of one may wait
for the broker mutex until the other's read ends (docs/SECURITY.md, "Known gaps").  A
reader alone, or beside bulk readers only, never waits, and the check between commands
compares two counters while no short reader is busy.  A read that completes no line runs
nothing and is not counted.

A client that sends short reads to look interactive gets what an interactive client gets:
bulk readers step aside for it a turn at a time, for a read of at most ``SHORT_READ``
commands each time, exactly as they do for the neighbour they protect, and never longer
than ``max_wait`` per turn.

A busy short neighbour may be blocked rather than running (a write to a client that does
not read, a journal sync before its reply): a wait that ends at ``max_wait`` without
anyone finishing or stepping aside marks it stalled, and the waiting reader does not step
aside again until some short reader finishes or some reader steps aside.  A blocked
neighbour costs a busy reader one ``max_wait``, not one per turn.

The reader counts a read's commands from the list of lines its framer returned
(``len``, no second pass over the bytes).
"""
import threading
import time

#: The most commands a read may hold and still be short (interactive): a command, and a
#: heartbeat ``ping`` or a few acks that rode along with it.
SHORT_READ = 4


class Turns:
    """The broker-wide count of busy short readers; make one ``Turn`` per reader with
    ``turn()``.

    ``turn`` (seconds): how long a reader runs commands before it steps aside for a busy
    neighbour; 0 turns taking turns off.  ``max_wait``: the longest one step aside waits.
    """

    def __init__(self, turn, max_wait, clock=time.monotonic):
        self.turn_seconds = turn
        self.max_wait = max_wait
        self.clock = clock
        #: Guards short_busy, events and waiting.  Taken only by Turn's methods, never while
        #: holding another CipherMQ lock (readers hold none between commands).
        self.mutex = threading.Lock()
        #: Notified (only if someone waits) when a short read ends or a reader steps aside.
        self.turn_ended = threading.Condition(self.mutex)
        #: Readers running the commands of a short read, stepping-aside ones included.
        #: Read without the lock as a hint by Turn.due().
        self.short_busy = 0
        self.events = 0             # short reads finished + steps aside, ever
        self.waiting = 0            # readers stepping aside right now

    def turn(self):
        """A new reader's Turn."""
        return Turn(self)

    def _end_turn_locked(self):
        """Count one turn ended and wake who waits for it.  Only called with the mutex held."""
        self.events += 1
        if self.waiting:
            self.turn_ended.notify_all()


class Turn:
    """One reader's turns: begin(commands) before a read's first command, end() after its
    last, and between commands ``if turn.due(): turn.step_aside()``.  Used by its reader
    only."""

    def __init__(self, turns):
        self.turns = turns
        self.enabled = turns.turn_seconds > 0
        self.short = False          # the current read is short (and counted in short_busy)
        self.started = 0.0
        self.stalled_at = -1        # turns.events when a neighbour last seemed blocked

    def begin(self, commands):
        """This reader starts running the ``commands`` commands of a read.  Does not block
        for long; takes the counter lock only for a short read."""
        if self.enabled:
            turns = self.turns
            self.short = 0 < commands <= SHORT_READ
            if self.short:
                with turns.mutex:
                    turns.short_busy += 1
            self.started = turns.clock()

    def end(self):
        """This reader has run and answered its read.  Does not block for long."""
        if self.short:
            self.short = False
            turns = self.turns
            with turns.mutex:
                turns.short_busy -= 1
                turns._end_turn_locked()

    def due(self):
        """True if a short reader other than this one is busy and this one's turn is over
        (a hint, no lock; always False with turns off, as nobody is counted then)."""
        turns = self.turns
        return (turns.short_busy > self.short and turns.events != self.stalled_at
                and turns.clock() - self.started > turns.turn_seconds)

    def step_aside(self):
        """Wait until a short reader finishes its read or a reader steps aside, at most
        max_wait; returns at once if no short reader other than this one is busy.

        Blocks; the caller must hold no lock.  Starts this reader's next turn.
        """
        turns = self.turns
        with turns.mutex:
            if turns.short_busy > self.short:
                turns._end_turn_locked()
                seen = turns.events
                turns.waiting += 1
                try:
                    if not turns.turn_ended.wait_for(lambda: turns.events != seen,
                                                     turns.max_wait):
                        self.stalled_at = seen      # nobody moved: a blocked neighbour
                finally:
                    turns.waiting -= 1
        self.started = turns.clock()


def between_chunks(turns):
    """A ``between_chunks`` callback for work done in chunks outside a read (the broker's
    mass requeue: Broker.close_session, Broker.retry_unacknowledged).

    The calling thread counts as a bulk reader from now on: between two chunks it steps
    aside for a short read once its turn is over, as a reader does between two commands.
    A bulk turn counts nothing in ``turns``, so there is nothing to end afterwards.
    """
    turn = turns.turn()
    turn.begin(SHORT_READ + 1)

    def step_aside_if_due():
        if turn.due():
            turn.step_aside()
    return step_aside_if_due
