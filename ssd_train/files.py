"""Atomic file writes: a crash leaves the previous file (or none), never half of one. No torch."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator:
    """A file object to write `path` through: a temp file beside it (same filesystem), flushed to disk
    and renamed over `path` when the block ends without an error, removed otherwise. OSError when the
    folder cannot be created or written."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_file_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temp file in `path`'s folder (created if needed): the same filesystem, so
    renaming it over `path` is atomic. Its mode is what the umask gives a new file, not mkstemp's 0600:
    a server running as another user must be able to read an exported repository."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp
