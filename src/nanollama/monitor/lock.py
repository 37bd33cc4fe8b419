"""One run per log dir: an OS file lock, which the kernel releases when the process dies (no stale lock
after a kill -9), naming its holder for the run that finds it taken.

A POSIX record lock (`lockf`), not `flock`: forked children (DataLoader workers) do not inherit it, so
the lock dies with the process that took it, and it also works on NFS.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class LogDirLock:
    """`acquire()` returns None once held, else who holds it ("host H, pid P"); `release()` lets it go."""

    def __init__(self, log_dir: str | os.PathLike):
        self.path = Path(log_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec: not passed to children
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return holder
        self.fd = fd
        with contextlib.suppress(OSError):  # on a full disk the lock holds all the same, unnamed
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None

    def __enter__(self) -> LogDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
