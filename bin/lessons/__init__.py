"""The tutorial's lessons (docs/TUTORIAL.md), one short function each; run with bin/lesson.py N."""
