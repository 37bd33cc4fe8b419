"""Writes that fail in one line naming their file: ENOSPC from write() carries no path of its own, and a
full disk must be reported as `No space left on device: <the file>`."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError raised inside without a path gets `path`."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def write_synced(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` and fsync it, so a rename that follows publishes complete bytes."""
    with naming(path), open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
