"""Trainer: one trainer per output directory.

The main process holds an advisory lock (``fcntl.flock``) on ``output_dir/.distsft.lock`` for the
run's whole life; the file names the holder (host, PID, start time). A second run on the same
directory (a resume started while orphaned ranks of the first still train, a duplicated sweep job)
stops at start-up naming the holder. The kernel drops the lock when its process dies, so a lock file
left by a killed run is simply taken over (and the log says whose it was). On NFS v4 ``flock`` is
forwarded to the server as a POSIX lock and works across hosts; on a filesystem without locks (Lustre
mounted without ``-o flock``) distsft warns that it cannot prevent two runs and goes on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger(__name__)
LOCK_NAME = ".distsft.lock"
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock, or raise ConfigError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(f"output_dir={self.path.parent} is in use by another distsft run ({_who(holder)}); wait "
                              f"for it to finish or stop it, or choose another output_dir "
                              f"(lock: {self.path})") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in UNSUPPORTED:
                raise
            log.warning("cannot lock %s on this filesystem (%s): nothing stops a second run from writing the same "
                        "output_dir", self.path, e.strerror)
            return
        previous = _read(fd)
        if previous:
            log.info("took over %s left by a run that is no longer running (%s)", self.path, _who(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a later run sees no holder to report
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}


def _who(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, PID {holder.get('pid')}, since {holder.get('started')}"
