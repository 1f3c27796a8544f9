"""Run one lesson of docs/TUTORIAL.md:  python bin/lesson.py N   (no N: list them).

    python bin/lesson.py 5 --http-port 15672 --hold   # watch it on the dashboard, then Enter

Each lesson starts the brokers, receivers and senders it needs on free ports
in a temporary directory, shows what happens, prints a ``✅ [LESSON N]`` line
for what it proved, and stops and removes everything it started.  Exit
status 0 if the lesson's point held, 1 if not, 2 for an unknown lesson, 3 if
it needs something not installed here (one line says what to install).
The lessons themselves are short functions in bin/lessons/.
"""
import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Runnable as ``python bin/lesson.py`` from a checkout, without installing the package.
for path in (str(HERE.parent), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

# These need the path above.
from lessons import basics, crashes, faults, framing, scaling, security  # noqa: E402
from lessons.stage import LessonFailed, LessonNeeds, Stage  # noqa: E402

#: Lesson number -> its function; the function's docstring is its title.
LESSONS = {
    1: basics.hello,
    2: basics.spy,
    3: basics.routing,
    4: basics.competing,
    5: crashes.kill_receiver,
    6: crashes.kill_sender,
    7: crashes.kill_broker,
    8: faults.chaos,
    9: faults.tamper_and_replay,
    10: faults.dead_letters,
    11: framing.framing,
    12: security.tls_and_users,
    13: scaling.scale_out,
}


def title(lesson):
    return lesson.__doc__.split(". ", 1)[1].split("\n")[0]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="lesson.py", description=__doc__.split("\n")[0])
    parser.add_argument("number", nargs="?", type=int, help="the lesson (none: list them)")
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="give the lesson's brokers a dashboard on this port, e.g. 15672")
    parser.add_argument("--hold", action="store_true",
                        help="keep everything running after the lesson until Enter is pressed")
    args = parser.parse_args(argv)
    if args.number is None:
        for number, lesson in LESSONS.items():
            print("%2d  %s" % (number, title(lesson)))
        return 0
    lesson = LESSONS.get(args.number)
    if lesson is None:
        print("Error: no lesson %d (there are lessons 1 to %d)" % (args.number, len(LESSONS)),
              file=sys.stderr)
        return 2
    print("📖 [LESSON %d] %s" % (args.number, title(lesson)), flush=True)
    with Stage(args.number, http_port=args.http_port) as stage:
        try:
            lesson(stage)
        except LessonFailed as exc:
            print("❌ [LESSON %d] %s" % (args.number, exc), flush=True)
            return 1
        except LessonNeeds as exc:
            print("❌ [LESSON %d] needs %s" % (args.number, exc), file=sys.stderr, flush=True)
            return 3
        if args.hold:
            input("⏸️ [LESSON %d] Still running; press Enter to stop everything " % args.number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
