"""What the figures were measured on: CPU, memory, software versions, the temp filesystem."""
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile

from ciphermq_broker import REPO


def _field(path, name):
    """The value of the first ``name: value`` (or ``name=value``) line of ``path``."""
    try:
        with open(path) as file:
            for line in file:
                if line.startswith(name):
                    return line[len(name):].lstrip(" \t:=").strip().strip('"')
    except OSError:
        pass
    return "unknown"


def _output(argv):
    """The stripped stdout of ``argv``, or None if it cannot run or fails."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _filesystem(path):
    """The filesystem holding ``path`` (fsync is only real on a real disk)."""
    best, found = "", "unknown"
    with open("/proc/mounts") as mounts:
        for entry in mounts:
            device, mount_point, fs_type = entry.split()[:3]
            if path.startswith(mount_point) and len(mount_point) > len(best):
                best, found = mount_point, f"{fs_type} ({device} on {mount_point})"
    return found


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe():
    """The machine and the software under test, as a dict of short strings (or None)."""
    memory_kib = _field("/proc/meminfo", "MemTotal").split()[0]
    commit = _output(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]) or "unknown"
    changed = _output(["git", "-C", REPO, "status", "--porcelain", "--", "ciphermq", "bin"])
    return {
        "cpus": f"{os.cpu_count()} (nproc {len(os.sched_getaffinity(0))})",
        "cpu_model": _field("/proc/cpuinfo", "model name"),
        "ram": f"{int(memory_kib) / 2 ** 20:.1f} GiB" if memory_kib.isdigit() else "unknown",
        "os": _field("/etc/os-release", "PRETTY_NAME"),
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "ciphermq": f"commit {commit}" + (" + uncommitted changes in ciphermq/ or bin/"
                                          if changed else ""),
        "rabbitmq": _output(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"]),
        "erlang": _output(["dpkg-query", "-W", "-f", "${Version}", "erlang-base"]),
        "pika": _version("pika"),
        "redis": _output(["dpkg-query", "-W", "-f", "${Version}", "redis-server"]),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "pycryptodome": _version("pycryptodome"),
        "matplotlib": _version("matplotlib"),
        "tmp_filesystem": _filesystem(tempfile.gettempdir()),
        "load_average": load_average(),
    }


def load_average():
    """The 1, 5 and 15 minute load averages: other work on the machine shows up here."""
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
