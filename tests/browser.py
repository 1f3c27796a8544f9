"""A real headless Chromium, driven over its DevTools pipe (no selenium, no websockets).

``chromium --remote-debugging-pipe`` reads DevTools commands from fd 3 and
writes replies and events to fd 4, each a JSON object ending in a NUL byte.
:class:`Browser` starts it, a reader thread puts every message it writes into
a ``queue.Queue``, and :meth:`Browser.call` waits there (bounded) for the
reply to its command.  Waiting for the page is done in the page: an
``awaitPromise`` evaluation resolves when the DOM shows what the test expects.
"""
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time

import pytest

WAIT = 20.0
NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium():
    """The Chromium executable; under CI=true a missing one fails the test, else skips it."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed (make browser-deps installs Debian's)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _move_high(fd):
    """``fd`` moved to a number >= 10, so that redirecting to 3 and 4 cannot clobber it."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class BrowserError(Exception):
    """Chromium answered a command with an error, or not at all in time."""


class Browser:
    """Headless Chromium with its DevTools pipe; ``close()`` ends it."""

    def __init__(self, executable, profile_dir):
        to_chromium, self._to_chromium = os.pipe()
        self._from_chromium, from_chromium = os.pipe()
        # The child's ends must become fds 3 and 4: first move them out of the way.
        to_chromium, from_chromium = (_move_high(fd) for fd in (to_chromium, from_chromium))
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--remote-debugging-pipe", "--user-data-dir=%s" % profile_dir, "about:blank"]
        # The pipe must be fds 3 and 4 in the child: bash puts it there.
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", 'exec "$@" 3<&%d 4>&%d' % (to_chromium, from_chromium), "bash",
             *args],
            pass_fds=(to_chromium, from_chromium),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chromium)
        os.close(from_chromium)
        self._messages = queue.Queue()
        self._events = []           # events seen while waiting for replies
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, name="test-chromium-pipe",
                                        daemon=True)
        self._reader.start()

    def _read(self):
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_chromium, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._messages.put(None)
                return
            buffer += chunk
            *complete, buffer = buffer.split(b"\0")
            for raw in complete:
                self._messages.put(json.loads(raw))

    def _next(self, deadline):
        try:
            message = self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise BrowserError("no answer from chromium in time") from None
        if message is None:
            raise BrowserError("chromium closed its DevTools pipe")
        return message

    def call(self, method, params=None, session=None, timeout=WAIT):
        """Send one command and return its result; BrowserError on error or timeout."""
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        os.write(self._to_chromium, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._next(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise BrowserError("%s: %s" % (method, message["error"]))
                return message["result"]
            self._events.append(message)

    def wait_event(self, method, session, timeout=WAIT):
        """The next event ``method`` of ``session`` (also one already seen)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self._events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self._events.remove(event)
                    return event
            self._events.append(self._next(deadline))

    def open(self, url, width=1200, height=800):
        """A new tab showing ``url``, loaded; returns its session id."""
        target = self.call("Target.createTarget", {"url": "about:blank",
                                                   "newWindow": True,
                                                   "width": width, "height": height})
        session = self.call("Target.attachToTarget",
                            {"targetId": target["targetId"], "flatten": True})["sessionId"]
        self.call("Page.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        self.wait_event("Page.loadEventFired", session)
        return session

    def evaluate(self, session, expression, timeout=WAIT):
        """The value of a JS expression in the page; a Promise is awaited (bounded)."""
        result = self.call("Runtime.evaluate",
                           {"expression": expression, "awaitPromise": True,
                            "returnByValue": True}, session=session, timeout=timeout)
        if "exceptionDetails" in result:
            raise BrowserError("page raised: %s" % result["exceptionDetails"])
        return result["result"].get("value")

    def wait_until(self, session, predicate, timeout=WAIT):
        """Wait, in the page, until the JS function ``predicate`` returns a truthy value.

        The predicate is checked now and after every render of the dashboard
        (its ``ciphermq:rendered`` event); returns that value.
        """
        expression = """new Promise(resolve => {
            const predicate = %s;
            const check = () => {
                const value = predicate();
                if (value) { document.removeEventListener("ciphermq:rendered", check);
                             resolve(value); }
            };
            document.addEventListener("ciphermq:rendered", check);
            check();
        })""" % predicate
        try:
            return self.evaluate(session, expression, timeout)
        except BrowserError as exc:
            raise BrowserError("the page never satisfied %s (%s)" % (predicate, exc)) from None

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self._to_chromium)
        self._reader.join(WAIT)         # EOF once chromium and its helpers are gone
        os.close(self._from_chromium)
