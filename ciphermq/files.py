"""Private files: created 0600 (directories 0700) whatever the umask, never through a symlink.

Everything CipherMQ writes may hold plaintext (the receiver's output and
rejects file), envelopes and their metadata (the journal, the sender's
outbox) or secrets (the users file).  Every such file is created here:

* the mode is given to ``open(2)`` itself, so no other user can open the file
  in the moment between its creation and a ``chmod`` (a umask can only take
  permissions away, so 0600 stays 0600);
* ``O_NOFOLLOW`` refuses a symlink planted at the final name, and a temporary
  or saved file is created with ``O_EXCL``: if anything -- a leftover, or a
  symlink someone planted to make us overwrite its target -- already has the
  name, the call fails and the target is never touched.

Existing files keep their mode: an operator who chose one is not overruled.
"""
import errno
import os
import time

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def make_private_directory(path):
    """Create ``path`` (and its parents) if missing; a directory created here is 0700."""
    os.makedirs(path, mode=DIRECTORY_MODE, exist_ok=True)


def open_private(path, flags):
    """``os.open`` with O_CREAT, O_NOFOLLOW and mode 0600; returns the descriptor.

    Raises OSError (ELOOP when ``path`` is a symlink).
    """
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | _CLOEXEC, FILE_MODE)


def open_append(path):
    """A binary file object appending to ``path``, created 0600 if it does not exist."""
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "ab")


def open_existing(path):
    """A binary file object reading and writing an existing ``path``, never through a symlink."""
    return os.fdopen(os.open(path, os.O_RDWR | os.O_NOFOLLOW | _CLOEXEC), "r+b")


def create_exclusive(path):
    """Create a new file 0600 and return its descriptor open for writing.

    Raises FileExistsError if anything -- a file, a directory, a symlink,
    dangling or not -- already has the name: it is never followed or reused.
    """
    return open_private(path, os.O_WRONLY | os.O_EXCL)


def create_unique(directory, prefix):
    """Create a new, never used file ``<prefix>.<UTC time>[.<n>]`` in ``directory``.

    Returns ``(path, descriptor)``.  Files made by earlier calls are never
    overwritten, even when two calls fall in the same second.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for number in range(1000):
        name = "%s.%s" % (prefix, stamp) if number == 0 else "%s.%s.%d" % (prefix, stamp, number)
        path = os.path.join(str(directory), name)
        try:
            return path, create_exclusive(path)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free name for a new file", prefix)


def write_all(fd, data):
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_atomically(path, data):
    """Replace ``path`` by a file holding ``data`` (bytes), 0600, all or nothing.

    Written to ``<path>.tmp`` (created exclusively: an existing one, a planted
    symlink included, is refused with FileExistsError and left alone),
    fsynced, renamed over ``path``, and the directory fsynced.
    """
    temporary = "%s.tmp" % path
    fd = create_exclusive(temporary)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(os.path.abspath(str(path))))


def fsync_directory(directory):
    """Make a file's creation, rename or removal in ``directory`` durable.

    A filesystem or platform that cannot fsync a directory (EINVAL, ENOTSUP)
    is not an error; any other failure (EIO) raises OSError.
    """
    fd = os.open(str(directory), os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)
