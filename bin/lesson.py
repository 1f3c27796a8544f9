"""Run one lesson of docs/TUTORIAL.md:  python bin/lesson.py N   (no N: list them).

Each lesson starts the brokers, receivers and senders it needs on free ports
in a temporary directory, shows what happens, prints a ``✅ [LESSON N]`` line
for what it proved, and stops and removes everything it started.  Exit
status 0 if the lesson's point held, 1 if not, 2 for an unknown lesson.
The lessons themselves are short functions in bin/lessons/.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Runnable as ``python bin/lesson.py`` from a checkout, without installing the package.
for path in (str(HERE.parent), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from lessons import basics, crashes, faults, security  # noqa: E402  (needs the path above)
from lessons.stage import LessonFailed, Stage  # noqa: E402

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
    11: security.tls_and_users,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        for number, lesson in LESSONS.items():
            print("%2d  %s" % (number, lesson.__doc__.split(". ", 1)[1].split("\n")[0]))
        return 0
    try:
        lesson = LESSONS[int(argv[0])]
    except (ValueError, KeyError):
        print("Error: no lesson %r (there are lessons 1 to %d)" % (argv[0], len(LESSONS)),
              file=sys.stderr)
        return 2
    print("📖 [LESSON %s] %s" % (argv[0], lesson.__doc__.split(". ", 1)[1].split("\n")[0]),
          flush=True)
    with Stage(int(argv[0])) as stage:
        try:
            lesson(stage)
        except LessonFailed as exc:
            print("❌ [LESSON %s] %s" % (argv[0], exc), flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
