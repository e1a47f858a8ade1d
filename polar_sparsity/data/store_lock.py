"""One writer per activation store: an exclusive, non-blocking lock beside the store directory.

The lock file sits beside the store (``.<name>.lock`` in its parent), not inside it: an overwrite
builds the new store in a sibling directory and renames it into place, and a lock inside the old
directory would move away with it. The kernel releases the lock when its holder exits, even after
``kill -9``, so a crashed run never leaves a store locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StoreBusyError(RuntimeError):
    """Another process holds the store's lock (a collect still running into it)."""


def lock_path(root: str | Path) -> Path:
    root = Path(root).resolve()  # one lock per store, whichever path (or symlink) names it
    return root.parent / f".{root.name}.lock"


@contextmanager
def store_lock(root: str | Path) -> Iterator[None]:
    """Hold the store's exclusive lock for the block; fail at once if another run holds it."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StoreBusyError(
                f"another run holds the store at {Path(root)} (lock {path}, held by process {holder}); "
                f"wait for it to finish, or use another paths.store"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
