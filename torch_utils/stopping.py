"""Stopping long work cleanly: SIGINT/SIGTERM end the current batch instead of the process, every
rank stops at the same batch, and a failed write (full disk, read-only folder, file-size limit)
becomes one line that names the file and the cause.

Used by train.py (the training loop), sample.py and ``fid.py toydata``. A stopped command prints
what it saved and the command that continues it, and exits with 128 + the signal number (or 1
after a failed write).
"""

import shlex
import signal
import sys
import threading

import torch

from torch_utils import distributed as dist


class Stopped(Exception):
    """Work stopped early by a signal or a failed write; ``code`` is the exit status to use
    (128 + the signal number, or 1) and the message (one line) says what was saved and how to
    continue."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopSignals:
    """Within ``with``: SIGINT and SIGTERM only set ``signum`` (the first signal received), so the
    work can finish its batch and save. Further signals change nothing (torchrun forwards a
    Ctrl-C a second time); kill -9 still ends the process at once. Installed in the main thread
    only (Python's rule); elsewhere the signals keep their handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def write_error(path, error):
    """One line for an OSError ``error`` raised while writing ``path`` (the file meant, not a
    temporary name): 'cannot write <path>: No space left on device'."""
    return f'cannot write {path}: {error.strerror or " ".join(str(error).split())}'


def agree_stop(signum, failure):
    """One collective per batch: (the signal to stop on, 0 for none; the first failure message or
    None) as every rank sees it, so that all ranks stop at the same batch."""
    if dist.get_world_size() == 1:
        return signum, failure
    flags = dist.all_reduce_sum(torch.tensor([int(signum), 1 if signum else 0, 1 if failure else 0],
                                             dtype=torch.int64)).tolist()
    signals, stopping, failed = flags
    if failed:
        messages = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(messages, failure)
        failure = next(m for m in messages if m)
    return (signum or (signals // stopping if stopping else 0)), failure


def signal_name(signum):
    return signal.Signals(signum).name


def continue_command(add=('--resume',), drop=('--overwrite',)):
    """The command line that continues this one: ``python <script> <its options>`` without
    ``drop`` and with ``add`` (when missing)."""
    args = [a for a in sys.argv[1:] if a not in drop]
    args += [a for a in add if a not in args]
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith('.py') else 'sample.py'
    return shlex.join(['python', script, *args])
