"""Exclusive locks on the folders and files a command writes, so that two commands never write one
place at once.

Every writer holds its output under a lock from its first check to its last write:
``train.py`` its run folder (and the experiments folder while it picks a new experiment number),
``sample.py`` its ``--outdir``, ``fid.py toydata`` its ``--dest`` folder, ``fid.py ref`` and
``python -m integrations.card export`` their output file. A second writer is refused at once with
one line that names the holder (process id, host, command, start time); readers (``fid.py calc``
and ``ref`` on an image folder) refuse a folder that is being written.

The lock is ``fcntl.flock`` on a lock file: ``<folder>/.lock`` for a folder,
``<folder>/.<name>.lock`` for a file. The kernel releases it when its holder ends in any way
(exit, exception, SIGKILL), so a crash leaves no lock that refuses the next run; the holder removes
the file when it releases the lock. An acquirer checks after locking that the file it locked is
still the one at the path (a holder may have removed it in between), which keeps removal safe.

Not guaranteed: file systems whose ``flock`` is local to one machine or missing (some network file
systems): there two hosts may both get the lock. A file system that refuses locks is reported.
"""

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time


FOLDER_LOCK = '.lock'


class LockHeld(ValueError):
    """Another process holds the lock: the message (one line) names it."""


def folder_lock_path(folder):
    return os.path.join(folder, FOLDER_LOCK)


def file_lock_path(path):
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}.lock')


def _holder_text(fd):
    """The holder recorded in an open lock file, in words."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode('utf-8') or '{}')
    except (OSError, ValueError):
        info = {}
    if not info:
        return 'another process (it has not recorded itself yet)'
    return (f"process {info.get('pid')} on {info.get('host')} since {info.get('since')} "
            f"({info.get('command')})")


class Lock:
    """An exclusive lock on ``target`` (a folder, or a file when ``is_file``); see the module
    docstring. ``what`` names the target in messages (e.g. ``'--outdir samples/x'``).

    ``wait``: seconds to wait for a busy lock (0: refuse at once with :class:`LockHeld`). A folder
    that does not exist is created; :meth:`release` with ``cleanup`` removes it again if the lock
    made it and it is empty. Usable as a context manager."""

    def __init__(self, target, what=None, is_file=False, wait=0.0):
        self.target = os.fspath(target)
        self.what = what or self.target
        self.path = file_lock_path(self.target) if is_file else folder_lock_path(self.target)
        self.created = None
        self.fd = None
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            self.created = _first_missing(folder)
            os.makedirs(folder, exist_ok=True)
        try:
            self._acquire(wait)
        except BaseException:
            self._remove_created()
            raise

    def _acquire(self, wait):
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise OSError(e.errno, f'cannot lock {self.what}: the file system refuses locks '
                                           f'({e.strerror})') from None
                holder = _holder_text(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise LockHeld(f'{self.what} is in use by {holder}: wait for it to finish or stop it; '
                               f'two writers would mix their results') from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)   # the holder removed the file between our open and our lock: try again
        self.fd = fd
        info = dict(pid=os.getpid(), host=socket.gethostname(), command=shlex.join(['python', *sys.argv])[:300],
                    since=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode('utf-8'))
        except OSError:
            pass   # a full disk: the lock holds all the same, only its holder goes unnamed

    def release(self, cleanup=False):
        """Remove the lock file and unlock; with ``cleanup`` also remove the folder the lock
        created when nothing else was written into it. Idempotent."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if cleanup:
            self._remove_created()

    def _remove_created(self):
        if self.created is None:
            return
        folder = os.path.dirname(self.path)
        while True:
            try:
                os.rmdir(folder)
            except OSError:
                return
            if os.path.abspath(folder) == os.path.abspath(self.created):
                return
            folder = os.path.dirname(folder)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.release(cleanup=exc_type is not None)

    def __del__(self):
        if getattr(self, 'fd', None) is not None:
            os.close(self.fd)


def _first_missing(folder):
    """The outermost folder of ``folder``'s path that does not exist."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(os.path.dirname(folder)):
        folder = os.path.dirname(folder)
    return folder


def lock_on_rank0(target, what=None, is_file=False, wait=0.0):
    """:class:`Lock` taken by rank 0 only (None on the other ranks); a refusal (one-line
    ValueError or OSError) is raised on every rank, so no rank goes on to write."""
    from torch_utils import distributed as dist  # pylint: disable=import-outside-toplevel  (holders need no torch)
    lock, err = None, None
    if dist.is_main():
        try:
            lock = Lock(target, what, is_file=is_file, wait=wait)
        except (ValueError, OSError) as e:
            err = str(e)
    dist.raise_on_any(err)
    return lock


def check_not_being_written(path, what=None):
    """ValueError (one line naming the writer) when a writer holds the folder ``path`` (or its
    enclosing folder, for a zip). Takes no lock and writes nothing."""
    lock_path = folder_lock_path(path) if os.path.isdir(path) else file_lock_path(path)
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ValueError(f'{what or path} is being written by {_holder_text(fd)}: wait for it to finish') \
                    from None
    finally:
        os.close(fd)
