"""One process per run directory: an exclusive ``flock`` on ``<run_dir>/.lock`` held for the whole run.

Two processes writing the same run directory (a SLURM job requeued while its first instance still
runs, the same command started twice) would interleave their metrics lines and overwrite each other's
checkpoints. The second one now stops before writing anything, with one line naming the holder. The
lock is released by the kernel when the holder exits, however it exits (a SIGKILL or a crash leaves no
stale lock; the file stays, holding the last holder's description).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

from alignreg.config import RunError


class RunLock:
    """Context manager; ``key`` names the config key of the directory in the error (``trainer.run_dir``)."""

    def __init__(self, run_dir: str | Path, key: str = "trainer.run_dir"):
        self.path = Path(run_dir) / ".lock"
        self.key = key
        self._f: Optional[object] = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # not "held": the file system refuses locks
                f.close()
                raise RunError(f"{self.key} {str(self.path.parent)!r}: cannot lock {self.path.name} ({e.strerror}); the file "
                               "system may not support flock (some NFS / Lustre mounts): use a local or flock-capable "
                               f"directory for {self.key}") from None
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunError(f"{self.key} {str(self.path.parent)!r} is in use by another alignreg run ({holder}); wait for "
                           f"it to end or stop it, or pick another {self.key}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None
