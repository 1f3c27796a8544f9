"""Real broker processes for tests: start ``python -m ciphermq.server``, read its port, kill it."""
import re
import signal
import subprocess
import sys
import threading

WAIT = 5.0


class BrokerProcess:
    """``python -m ciphermq.server`` in a subprocess; its log is collected by a reader thread."""

    def __init__(self, *args, port=0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciphermq.server", "--port", str(port), *args],
            stderr=subprocess.PIPE, text=True)
        self.lines = []
        self._new_line = threading.Condition()     # notified by the reader for every line
        self._port_found = threading.Event()
        self.port = None
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._port_found.wait(WAIT * 2):
            self.proc.kill()
            raise AssertionError("broker did not log its port:\n" + "".join(self.lines))

    def _read_log(self):
        for line in self.proc.stderr:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._port_found.set()

    def wait_for_log(self, text, count=1, timeout=WAIT * 4):
        """Block until ``count`` log lines contain ``text``; AssertionError on timeout."""
        with self._new_line:
            if not self._new_line.wait_for(
                    lambda: sum(text in line for line in self.lines) >= count, timeout):
                raise AssertionError("fewer than %d log lines with %r:\n%s"
                                     % (count, text, "".join(self.lines)))

    @property
    def log(self):
        return "".join(self.lines)

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    def kill(self):
        """SIGKILL: the broker gets no chance to write or close anything."""
        self.proc.kill()
        self.proc.wait(WAIT * 2)
        self.close()

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        code = self.proc.wait(WAIT * 2)
        self.close()
        return code

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(WAIT)
        self.proc.stderr.close()
