"""One run per workdir: an exclusive `fcntl` lock on `workdir/lock`, which holds the owner's pid.

Two runs in one workdir would interleave `metrics.jsonl` and overwrite each other's checkpoints.
The kernel drops an `fcntl` lock when its process dies, however it dies, so a lock file left by a
killed run is simply taken over; the pid inside only names the owner in the refusal. Only process
0 of a multi-host run takes it (all processes of one run share the workdir).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from blip2_jax.errors import UserError


class WorkdirBusy(UserError):
    """Another live process holds the workdir."""


class WorkdirLock:
    """Held from `acquire()` to `release()` (or the process's end)."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / "lock"
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise WorkdirBusy(f"workdir {self.path.parent} is in use by process {owner} (lock {self.path}); "
                              "wait for it to end or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
