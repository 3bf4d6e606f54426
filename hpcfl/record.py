"""A run's evaluations and every rank's timings, brought to rank 0 in one Reduce per evaluation
and written into the results file (rank 0 only: docs/ARCHITECTURE.md, "Invariants")."""
from __future__ import annotations

import os
import time

import numpy as np

from .store import TIMING, ResultsFile
from .world import World


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since this module loaded),
    so that a run's start-up counts the interpreter's and torch's imports as a user sees them."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.time() - _LOADED


_LOADED = time.time()


class Recorder:
    """Brings evaluations and every rank's timings to rank 0 and writes them (rank 0 only)."""

    def __init__(self, world: World, store: ResultsFile | None, nbytes: int):
        self.world, self.store, self.nbytes = world, store, nbytes
        self.rows: list[tuple[int, list[float]]] = []  # (round, seconds of each TIMING phase)

    def note_startup(self) -> None:
        """Start-up (process start to the first round, all ranks ready) into the results file."""
        if self.store is not None:
            self.store.f.attrs["startup_s"] = process_age()

    def time_round(self, rnd: int, compute: float, allreduce: float, exchange: float) -> None:
        self.rows.append((rnd, [compute, allreduce, exchange, 0.0]))

    def _reduce(self, table: np.ndarray):
        """One Reduce for the client table and the timing rows since the last call."""
        w = self.world
        timing = np.zeros((len(self.rows), w.size, len(TIMING) - 1))  # rank 0 adds io
        timing[:, w.rank] = [r for _, r in self.rows]
        rounds, self.rows = [rnd for rnd, _ in self.rows], []
        total = w.reduce_sum_to_main(np.concatenate([table.ravel(), timing.ravel()]))
        if total is None:
            return None, None, rounds
        return (total[:table.size].reshape(table.shape),
                total[table.size:].reshape(timing.shape), rounds)

    def _write_timing(self, timing: np.ndarray, rounds: list[int], io_s: float) -> None:
        io = np.zeros(timing.shape[:2])
        io[-1, 0] = io_s
        self.store.append_timing(rounds, self.nbytes,
                                 dict(zip(TIMING, [*np.moveaxis(timing, 2, 0), io])))
        self.store.flush()

    def evaluation(self, rnd: int, table: np.ndarray, eval_s: float, train_loss: float,
                   t0: float, start: float, epsilon: float | None = None) -> dict | None:
        self.rows[-1][1][TIMING.index("eval")] = eval_s
        table, timing, rounds = self._reduce(table)
        if table is None:
            return None
        acc, loss = table[:, 0] / table[:, 2], table[:, 1] / table[:, 2]
        now = time.perf_counter()
        row = dict(round=rnd, test_acc_mean=acc.mean(),
                   test_acc_weighted=table[:, 0].sum() / table[:, 2].sum(),
                   test_loss_mean=loss.mean(), train_loss=train_loss, round_time_s=now - t0,
                   elapsed_s=now - start)
        if epsilon is not None:
            row["epsilon"] = epsilon
        self.store.append_eval(row, dict(test_acc=acc, test_loss=loss))
        self.store.flush()
        self._write_timing(timing, rounds, time.perf_counter() - now)
        return row

    def flush_timing(self) -> None:
        """Timing rows of rounds after the last evaluation (before a checkpoint)."""
        if self.rows:
            _, timing, rounds = self._reduce(np.zeros(0))
            if timing is not None:
                self._write_timing(timing, rounds, 0.0)
