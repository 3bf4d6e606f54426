"""The results file `<output.dir>/<output.name>.h5` (schema in README.md, "Results file").

Written by rank 0 alone, appended one evaluation at a time and flushed after each, so a crash
leaves every finished row readable. The file is opened without HDF5 file locking so that
analysis scripts can read it while the run writes it.
"""
from __future__ import annotations

import datetime as dt
import platform
import subprocess
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1
METRICS = ("round", "test_acc_mean", "test_acc_weighted", "test_loss_mean", "train_loss",
           "round_time_s", "elapsed_s")
CLIENT_METRICS = ("test_acc", "test_loss")
TIMING = ("compute", "allreduce", "eval", "io")


def git_commit() -> str:
    """Commit of the hpcfl source tree, '+dirty' if it has local changes; 'unknown' outside git."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _append(ds: h5py.Dataset, rows) -> None:
    rows = np.asarray(rows, dtype=ds.dtype)
    n = ds.shape[0]
    ds.resize(n + len(rows), axis=0)
    ds[n:] = rows


class ResultsFile:
    """One run's results: root attrs, /metrics, /clients, /timing."""

    def __init__(self, path: Path, attrs: dict, num_train: list[int], num_test: list[int],
                 world_size: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = h5py.File(path, "w", locking=False)
        self.f.attrs.update(schema="hpcfl-results", schema_version=SCHEMA_VERSION,
                            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            status="running", python_version=platform.python_version(),
                            h5py_version=h5py.__version__, **attrs)
        n = len(num_train)
        metrics = self.f.create_group("metrics")
        for name in METRICS:
            metrics.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(1024,),
                                   dtype="i8" if name == "round" else "f8")
        clients = self.f.create_group("clients")
        clients["num_samples"] = np.asarray(num_train, dtype="i8")
        clients["num_test_samples"] = np.asarray(num_test, dtype="i8")
        for name in CLIENT_METRICS:
            clients.create_dataset(name, shape=(0, n), maxshape=(None, n), dtype="f4",
                                   chunks=(max(1, min(64, 2 ** 16 // n)), n))
        timing = self.f.create_group("timing")
        timing.create_dataset("round", shape=(0,), maxshape=(None,), chunks=(1024,), dtype="i8")
        for name in TIMING:
            timing.create_dataset(f"{name}_s", shape=(0, world_size), maxshape=(None, world_size),
                                  chunks=(256, world_size), dtype="f8")
        self.f.flush()

    def append_eval(self, metrics: dict, per_client: dict[str, np.ndarray]) -> None:
        for name in METRICS:
            _append(self.f["metrics"][name], [metrics[name]])
        for name in CLIENT_METRICS:
            _append(self.f["clients"][name], per_client[name][None, :])

    def append_timing(self, rounds: list[int], per_phase: dict[str, np.ndarray]) -> None:
        """per_phase[name]: (len(rounds), world_size) seconds."""
        _append(self.f["timing"]["round"], rounds)
        for name in TIMING:
            _append(self.f["timing"][f"{name}_s"], per_phase[name])

    def flush(self) -> None:
        self.f.flush()

    def close(self, status: str, **attrs) -> None:
        if self.f.id.valid:
            self.f.attrs.update(status=status, **attrs)
            self.f.close()
