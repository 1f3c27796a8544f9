"""Taking turns: a connection busy with a long read steps aside for a neighbour's commands.

Every connection's reader runs the commands of one read (up to 256 KiB of lines) in a
row, and the two things it needs are not handed out fairly:

* the broker mutex is a plain lock.  A reader that releases it and takes it again a few
  microseconds later, for its next command, nearly always beats a neighbour that was woken
  to take it (that thread is still being scheduled), so a neighbour's one publish can wait
  for all 500 commands of an attacker's pipelined write;
* the interpreter lock is taken from a running thread only every switch interval
  (``--switch-interval``).

So readers take turns, as processes do on an Erlang VM, whose scheduler lets each one run
a budget of reductions and then the next: ``Turns`` counts the readers that are running
the commands of a read ("busy").  A reader that has run commands for longer than ``turn``
seconds while another reader is busy steps aside between two commands: it waits until
another reader finishes its read or steps aside in turn, at most ``max_wait`` seconds, and
then goes on with a new turn.  Two busy readers thus alternate turn by turn, and a
well-behaved neighbour's command waits about one turn.  A reader alone never waits, and
the check between commands is one attribute read while no other reader is busy.

A busy neighbour may be blocked rather than running (a write to a client that does not
read, a journal sync): a wait that ends at ``max_wait`` without anyone finishing or
stepping aside marks it stalled, and the waiting reader does not step aside again until
some reader finishes or steps aside.  A blocked neighbour costs a busy reader one
``max_wait``, not one per turn.
"""
import threading
import time


class Turns:
    """The broker-wide count of busy readers; make one ``Turn`` per reader with ``turn()``.

    ``turn`` (seconds): how long a reader runs commands before it steps aside for a busy
    neighbour; 0 turns taking turns off.  ``max_wait``: the longest one step aside waits.
    """

    def __init__(self, turn, max_wait, clock=time.monotonic):
        self.turn_seconds = turn
        self.max_wait = max_wait
        self.clock = clock
        #: Guards busy, events and waiting.  Taken only by Turn's methods, never while
        #: holding another CipherMQ lock (readers hold none between commands).
        self.mutex = threading.Lock()
        #: Notified (only if someone waits) when a reader finishes a read or steps aside.
        self.turn_ended = threading.Condition(self.mutex)
        #: Readers running the commands of a read, stepping-aside ones included.  Read
        #: without the lock as a hint by Turn.due().
        self.busy = 0
        self.events = 0             # reads finished + steps aside, ever
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
    """One reader's turns: begin() before a read's first command, end() after its last,
    and between commands ``if turn.due(): turn.step_aside()``.  Used by its reader only."""

    def __init__(self, turns):
        self.turns = turns
        self.enabled = turns.turn_seconds > 0
        self.started = 0.0
        self.stalled_at = -1        # turns.events when a neighbour last seemed blocked

    def begin(self):
        """This reader starts running the commands of a read.  Does not block for long."""
        if self.enabled:
            turns = self.turns
            with turns.mutex:
                turns.busy += 1
            self.started = turns.clock()

    def end(self):
        """This reader has run and answered its read.  Does not block for long."""
        if self.enabled:
            turns = self.turns
            with turns.mutex:
                turns.busy -= 1
                turns._end_turn_locked()

    def due(self):
        """True if another reader is busy and this one's turn is over (a hint, no lock)."""
        turns = self.turns
        return (self.enabled and turns.busy > 1 and turns.events != self.stalled_at
                and turns.clock() - self.started > turns.turn_seconds)

    def step_aside(self):
        """Wait until another reader finishes its read or steps aside, at most max_wait.

        Blocks; the caller must hold no lock.  Starts this reader's next turn.
        """
        turns = self.turns
        with turns.mutex:
            if turns.busy > 1:
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
