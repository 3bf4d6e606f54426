"""`<name>.lock` beside a results file: one process at a time writes a run.

Without it a second process on the same output.name (a resubmitted job while the first still
runs, two array elements by mistake) would resume from the first one's checkpoint and both would
write one file. The lock is a POSIX record lock (fcntl.lockf, which NFS and Lustre forward to
their lock managers) held by rank 0 for the run; the kernel drops it when the holder dies, so a
lock file left by a killed run never blocks a rerun. The file names its holder for the error.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from .config import ConfigError, OutputConfig
from .oneline import one_line

log = logging.getLogger("hpcfl")


class RunLock:
    def __init__(self, results: Path):
        self.results, self.path, self.fd = results, results.with_suffix(".lock"), None

    def acquire(self) -> "RunLock":
        """Take the lock or raise ConfigError naming its holder; creates the output folder.
        A folder that cannot be created or written is a ConfigError as well."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"output.dir: cannot write to {folder} ({one_line(e)})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. ENOLCK: no lock manager
                os.close(fd)
                log.warning("%s: file locks unsupported here (%s); nothing stops a second "
                            "process from writing this run", self.path, one_line(e))
                return self
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"output.name: {self.results} is being written by {holder}; "
                              "wait for it to end, or choose another output.name") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released and removed it between our open and our lock
            os.close(fd)
            return self.acquire()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            # removed while still held, so that no process can lock the old file meanwhile
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def lock_output(output: OutputConfig, world) -> RunLock | None:
    """Rank 0 takes the run's lock (None on the other ranks: the lock is rank 0's alone); if it
    cannot, every rank raises the same ConfigError."""
    lock, why = None, None
    if world.is_main:
        try:
            lock = RunLock(Path(output.dir) / f"{output.name}.h5").acquire()
        except ConfigError as e:
            why = str(e)
    why = world.from_main(why)
    if why:
        raise ConfigError(why, every_rank=True)
    return lock
