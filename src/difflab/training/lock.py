"""One writer per run folder: an advisory lock held by the process that trains in it.

Two processes writing one run folder (two ``--resume RUN`` at once, or ``--overwrite`` of a folder that is still
training) would mix their checkpoints and log rows. The training process therefore holds ``RUN/.lock`` with
``flock`` for as long as it writes the folder. The operating system drops the lock when the process ends, however
it ends, so a SIGKILL or a power cut never leaves a stale lock to clean up by hand; the file itself stays and only
says who held it last. A second writer is refused in one line that names the holder's PID and host.

The lock is advisory (it stops difflab, not ``rm``) and needs ``fcntl`` (Linux, macOS, the BSDs); where there
is none, or the file system cannot lock (some network file systems), runs are not locked (with a warning
there). Readers (``difflab sample``, ``load``) never take it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from difflab.errors import DifflabError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not locked
    fcntl = None

LOCK_NAME = ".lock"
UNSUPPORTED = tuple(getattr(errno, name) for name in ("ENOSYS", "ENOLCK", "EOPNOTSUPP", "ENOTSUP") if hasattr(errno, name))


class RunFolderBusy(DifflabError):
    """Another process holds the run folder's lock."""


class RunLock:
    """``RUN/.lock``, held from :meth:`acquire` until :meth:`release` or the end of the process."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> RunLock:
        """Take the lock without waiting; :class:`RunFolderBusy` names the holder when another process has it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DifflabError(f"cannot write in run folder '{self.folder}': {e.strerror}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in UNSUPPORTED:  # some network file systems (Lustre without flock, SMB): go on unlocked
                    print(f"warning: the file system of '{self.folder}' cannot lock files ({e.strerror}); make sure "
                          "no other process writes this run folder")
                    self._fd = fd
                    return self
                holder = _holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
                os.close(fd)
                if holder is None:
                    raise DifflabError(f"cannot lock run folder '{self.folder}': {e.strerror}") from None
                raise RunFolderBusy(f"run folder '{self.folder}' is in use: difflab {holder} is writing it; wait "
                                    "for it to finish or stop it (Ctrl-C saves a checkpoint) before "
                                    "resuming or overwriting it") from None
        # who holds it, for the message of a second writer (the lock itself is the flock, not this text)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, only the holder's name is missing
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # nobody holds it now; closing the file releases the flock
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """'process 123 on host x (since ...)' from the lock file; the holder may not have written it yet."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode())
            return f"process {info['pid']} on host {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process"
