"""Progress of long work (output.progress): a tqdm bar with its ETA on a terminal; in a log (a
Slurm job's file) one line every tenth of the work with the time left; or nothing."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("hpcfl")


def resolve(mode: str) -> str:
    """output.progress=auto: a bar on a terminal, log lines otherwise."""
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return mode


class LogProgress:
    """tqdm's update/close, written as a log line at every tenth of `total`, with the ETA."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.next = max(total, 1), desc, 0, 1
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done * 10 >= self.next * self.total:
            self.next = self.done * 10 // self.total + 1
            spent = time.perf_counter() - self.start
            left = spent * (self.total - self.done) / self.done
            log.info("%s: %d/%d (%d%%) in %.0f s, about %.0f s left", self.desc, self.done,
                     self.total, 100 * self.done // self.total, spent, left)

    def close(self) -> None:
        pass


def progress(total: int, mode: str, desc: str, unit: str = "it"):
    """A progress display for `total` steps of work, per output.progress (`mode`)."""
    mode = resolve(mode)
    if mode == "log":
        return LogProgress(total, desc)
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=mode != "bar")
