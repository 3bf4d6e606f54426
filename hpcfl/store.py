"""The results file `<name>.h5` and the checkpoint `<name>.ckpt.h5` (schemas in docs/results-schema.md).

Both are written by rank 0 alone. The results file is appended one evaluation at a time and
flushed after each, so a crash leaves every finished row readable; it is opened without HDF5
file locking so that analysis scripts can read it while the run writes it. A checkpoint is
written whole to a temporary file, fsynced and renamed over the last one (which is kept as
`<name>.ckpt.prev.h5`), and carries a SHA-256 of its contents, so a damaged file is detected
instead of trained on.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .oneline import one_line

# Each file's format version, and the hpcfl release that first wrote it (hpcfl's own version is
# at least the newest: a format that changed is a new release; a test checks it).
SCHEMA_VERSIONS = {2: "0.2.0",  # /clients/ids, /timing/exchange_s, startup_s, checkpoint_*
                   3: "0.3.0"}  # /segments
CHECKPOINT_VERSIONS = {2: "0.2.0",  # every client's private row, in id order
                       3: "0.3.0"}  # /private_ids: the rows of the clients that trained only
SCHEMA_VERSION, CHECKPOINT_VERSION = max(SCHEMA_VERSIONS), max(CHECKPOINT_VERSIONS)
METRICS = ("round", "test_acc_mean", "test_acc_weighted", "test_loss_mean", "train_loss",
           "round_time_s", "elapsed_s")
CLIENT_METRICS = ("test_acc", "test_loss")
TIMING = ("compute", "allreduce", "exchange", "eval", "io")  # io last: rank 0 fills it
CHUNK_BYTES = 64 << 20  # private state read and written this much at a time


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
    if rows.ndim == 2 and rows.shape[1] != ds.shape[1]:
        if rows.shape[1] > ds.shape[1]:
            ds.resize(rows.shape[1], axis=1)
        else:
            rows = np.pad(rows, ((0, 0), (0, ds.shape[1] - rows.shape[1])),
                          constant_values=np.nan)
    n = ds.shape[0]
    ds.resize(n + len(rows), axis=0)
    ds[n:] = rows


SEGMENT = {"from_round": "i8", "to_round": "i8", "world_size": "i8", "hostnames": "str",
           "device": "str", "git_commit": "str", "hpcfl_version": "str", "torch_version": "str",
           "started": "str"}  # /segments: one row per start of the run (a resume adds one)


def _add_segment(f: h5py.File, from_round: int, attrs: dict) -> None:
    """A row of /segments: what ran from `from_round` on (to_round follows the timing rows)."""
    g = f.require_group("segments")
    for name, kind in SEGMENT.items():
        if name not in g:
            g.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(64,),
                             dtype=h5py.string_dtype() if kind == "str" else kind)
    row = {**attrs, "from_round": from_round, "to_round": from_round,
           "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for name in SEGMENT:
        _append(g[name], [row.get(name, "" if SEGMENT[name] == "str" else -1)])


class ResultsFile:
    """One run's results: root attrs, /metrics, /clients, /timing."""

    def __init__(self, f: h5py.File):
        self.f = f

    @classmethod
    def resume(cls, path: Path, rnd: int, attrs: dict) -> "ResultsFile":
        """Reopen a run's file to go on after round `rnd`: rows of later rounds (written after
        the checkpoint) are dropped, so no round is ever recorded twice."""
        f = h5py.File(path, "r+", locking=False)
        for name in TIMING:  # a file from before a phase existed gets its column
            if f"{name}_s" not in f["timing"]:
                ds = f["timing"]["compute_s"]
                f["timing"].create_dataset(f"{name}_s", data=np.full(ds.shape, np.nan),
                                           maxshape=(None, None), chunks=(256, 1),
                                           fillvalue=np.nan)
        if "ids" not in f["clients"]:  # schema 1: every client was evaluated, in id order
            f["clients"]["ids"] = np.arange(f["clients/test_acc"].shape[1], dtype="i8")
        if "segments" not in f:  # schema 1: its one segment, from the root attrs it left
            _add_segment(f, 0, {k: f.attrs[k] for k in SEGMENT if k in f.attrs})
            timed = f["timing/round"]
            f["segments/to_round"][-1] = int(timed[-1]) if len(timed) else 0
        to = f["segments/to_round"]
        to[:] = np.minimum(to[:], rnd)  # rounds after the checkpoint are dropped below
        _add_segment(f, rnd, attrs)
        keep = int((f["metrics/round"][:] <= rnd).sum())
        for ds in [*f["metrics"].values(), f["clients/test_acc"], f["clients/test_loss"]]:
            ds.resize(keep, axis=0)
        keep = int((f["timing/round"][:] <= rnd).sum())
        for ds in f["timing"].values():
            ds.resize(keep, axis=0)
        f.attrs.update(status="running", resumed_from_round=rnd, **attrs)
        f.flush()
        return cls(f)

    @classmethod
    def create(cls, path: Path, attrs: dict, sizes: tuple, evaluated: np.ndarray,
               world_size: int, extra_metrics: tuple[str, ...] = ()) -> "ResultsFile":
        """A new results file: `sizes` every client's (train, test) set sizes, `evaluated` the
        ids of the clients every evaluation covers (the columns of /clients/test_acc, ...);
        `extra_metrics` are /metrics columns of this method only (the DP baselines' epsilon)."""
        num_train, num_test = sizes
        path.parent.mkdir(parents=True, exist_ok=True)
        self = cls(h5py.File(path, "w", locking=False))
        self.f.attrs.update(schema="hpcfl-results", schema_version=SCHEMA_VERSION,
                            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            status="running", python_version=platform.python_version(),
                            h5py_version=h5py.__version__, **attrs)
        n = len(evaluated)
        metrics = self.f.create_group("metrics")
        for name in (*METRICS, *extra_metrics):
            metrics.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(1024,),
                                   dtype="i8" if name == "round" else "f8")
        clients = self.f.create_group("clients")
        clients["num_samples"] = np.asarray(num_train, dtype="i8")
        clients["num_test_samples"] = np.asarray(num_test, dtype="i8")
        clients["ids"] = np.asarray(evaluated, dtype="i8")
        for name in CLIENT_METRICS:
            clients.create_dataset(name, shape=(0, n), maxshape=(None, n), dtype="f4",
                                   chunks=(max(1, min(64, 2 ** 16 // n)), n))
        _add_segment(self.f, 0, attrs)
        timing = self.f.create_group("timing")
        timing.create_dataset("round", shape=(0,), maxshape=(None,), chunks=(1024,), dtype="i8")
        timing.create_dataset("allreduce_bytes", shape=(0,), maxshape=(None,), chunks=(1024,),
                              dtype="i8")
        for name in TIMING:
            # Columns are ranks; a run resumed with more ranks widens it (NaN where no rank was).
            timing.create_dataset(f"{name}_s", shape=(0, world_size), maxshape=(None, None),
                                  chunks=(256, 1), dtype="f8", fillvalue=np.nan)
        self.f.flush()
        return self

    def append_eval(self, metrics: dict, per_client: dict[str, np.ndarray]) -> None:
        for name, ds in self.f["metrics"].items():
            _append(ds, [metrics[name]])
        for name in CLIENT_METRICS:
            _append(self.f["clients"][name], per_client[name][None, :])

    def append_timing(self, rounds: list[int], nbytes: int,
                      per_phase: dict[str, np.ndarray]) -> None:
        """per_phase[name]: (len(rounds), world_size) seconds."""
        _append(self.f["timing"]["round"], rounds)
        _append(self.f["timing"]["allreduce_bytes"], [nbytes] * len(rounds))
        for name in TIMING:
            _append(self.f["timing"][f"{name}_s"], per_phase[name])
        if rounds:
            self.f["segments/to_round"][-1] = max(rounds)

    def note_checkpoint(self, seconds: float, nbytes: int) -> None:
        """The last checkpoint's write time and size."""
        self.f.attrs.update(checkpoint_s=seconds, checkpoint_bytes=nbytes)

    def flush(self) -> None:
        self.f.flush()

    def close(self, status: str, **attrs) -> None:
        if self.f.id.valid:
            self.f.attrs.update(status=status, **attrs)
            self.f.close()


class NotResults(Exception):
    """A file that is not a readable hpcfl results file; the message says why, in one line."""


@dataclass
class StoredRun:
    """What a results file says of its run: its status, its config (YAML) and, per attack in
    /privacy, the config of that attack's run."""
    status: str
    config: str
    attacks: dict[str, str]


NEEDED = ("metrics/round", "timing/round", "clients/test_acc")  # what a run goes on from


def read_results(path: Path) -> StoredRun:
    """The run of the results file at `path`, once the file is known to read whole (a truncated
    copy, or a full disk at its last write, fails reading NEEDED); NotResults otherwise (a
    folder, not HDF5, damaged, another program's file). The one test of "is this a results
    file" (--from, resume, a sweep's finished point, an attack's file)."""
    if Path(path).is_dir():
        raise NotResults("a directory")
    try:
        with h5py.File(path, "r", locking=False) as f:
            missing = [name for name in NEEDED if name not in f]
            if missing or "config" not in f.attrs:
                raise NotResults(f"no {', '.join(missing or ['config attribute'])}")
            for name in NEEDED:
                f[name][...]
            attacks = {name: str(g.attrs.get("config", ""))
                       for name, g in f["privacy"].items()} if "privacy" in f else {}
            return StoredRun(str(f.attrs.get("status", "")), str(f.attrs["config"]), attacks)
    except (OSError, KeyError, ValueError) as e:  # h5py's ways of saying "damaged"
        raise NotResults(one_line(e)) from None


def mark_completed(path: Path) -> None:
    with h5py.File(path, "r+", locking=False) as f:
        if f.attrs.get("status") != "completed":
            f.attrs["status"] = "completed"


# ---------------------------------------------------------------- checkpoints

class CheckpointError(Exception):
    """A checkpoint that cannot be trusted (truncated, corrupted, or not ours)."""


@dataclass
class Checkpoint:
    round: int
    config: str          # the YAML of the run that wrote it
    elapsed_s: float
    shared: dict[str, np.ndarray]


def checkpoint_paths(results: Path) -> tuple[Path, Path]:
    stem = results.with_suffix("")
    return stem.with_name(stem.name + ".ckpt.h5"), stem.with_name(stem.name + ".ckpt.prev.h5")


def rows_per_chunk(row_shape: tuple, itemsize: int = 4) -> int:
    return max(1, CHUNK_BYTES // max(1, int(np.prod(row_shape)) * itemsize))


def _digest(f: h5py.File) -> str:
    """SHA-256 of round, config and every array in a fixed order, read a chunk at a time (what
    CheckpointWriter computes while writing)."""
    h = hashlib.sha256()
    h.update(f"{int(f.attrs['round'])}|{f.attrs['config']}|".encode())
    for group in ("shared", "private"):
        if group == "private" and "private_ids" in f:
            h.update(b"private_ids")
            h.update(np.ascontiguousarray(f["private_ids"][:]).tobytes())
        for name in sorted(f[group]):
            h.update(f"{group}/{name}".encode())
            ds = f[group][name]
            if ds.ndim == 0 or len(ds) == 0:
                h.update(np.ascontiguousarray(ds[...]).tobytes())
                continue
            step = rows_per_chunk(ds.shape[1:], ds.dtype.itemsize)
            for i in range(0, len(ds), step):
                h.update(np.ascontiguousarray(ds[i:i + step]).tobytes())
    return h.hexdigest()


class CheckpointWriter:
    """A checkpoint written piece by piece, its checksum computed as it goes: the shared state,
    the ids of the clients whose private state has been written (sorted; a client that never
    trained is at its start value, which the run knows), then each private tensor (sorted by
    name) as rows of those clients in id order, appended in chunks (no process holds more than
    its own rows and one chunk). Plain arrays, no pickle.
    Atomic: written to a temporary file, fsynced and renamed over `path`, which is kept as
    `prev`; a crash at any point leaves the last good checkpoint in place."""

    def __init__(self, paths: tuple[Path, Path], rnd: int, config: str, elapsed_s: float,
                 shared: dict[str, np.ndarray]):
        self.path, self.prev = paths
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        self.f = h5py.File(self.tmp, "w", locking=False)
        try:
            self._start(rnd, config, elapsed_s, shared)
        except OSError:
            self.abandon()
            raise

    def _start(self, rnd: int, config: str, elapsed_s: float,
               shared: dict[str, np.ndarray]) -> None:
        self.f.attrs.update(round=rnd, config=config, elapsed_s=elapsed_s,
                            format="hpcfl-checkpoint", schema_version=CHECKPOINT_VERSION,
                            rng="none stored: every random draw derives from (seed, round, "
                                "client)")
        self.h = hashlib.sha256()
        self.h.update(f"{rnd}|{config}|".encode())
        g = self.f.create_group("shared")
        for name in sorted(shared):
            g.create_dataset(name, data=shared[name])
            self.h.update(f"shared/{name}".encode())
            self.h.update(np.ascontiguousarray(shared[name]).tobytes())
        self.private = self.f.create_group("private")
        self.ds, self.at = None, 0

    def abandon(self) -> None:
        """After a failed write (a full disk, a file size limit): close what still closes and
        remove the temporary file. The last good checkpoint was never touched."""
        try:
            self.f.close()
        except (OSError, RuntimeError):  # a file that failed a write may fail to close too
            pass
        self.tmp.unlink(missing_ok=True)

    def ids(self, ids: np.ndarray) -> None:
        """The sorted ids of the clients whose rows follow (before the first `begin`)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.f.create_dataset("private_ids", data=ids)
        self.h.update(b"private_ids")
        self.h.update(ids.tobytes())

    def begin(self, name: str, shape: tuple[int, ...]) -> None:
        """The next private tensor (names in sorted order): `shape` (clients, *row shape)."""
        self.ds = self.private.create_dataset(name, shape=shape, dtype="f4")
        self.at = 0
        self.h.update(f"private/{name}".encode())

    def write(self, rows: np.ndarray) -> None:
        """The next rows of the current tensor, in client-id order."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.ds[self.at:self.at + len(rows)] = rows
        self.at += len(rows)
        self.h.update(rows.tobytes())

    def finish(self) -> int:
        """Seal, sync and rename; returns the file's size in bytes."""
        self.f.attrs["sha256"] = self.h.hexdigest()
        self.f.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if self.path.exists():
            os.replace(self.path, self.prev)
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path.stat().st_size


def verify_checkpoint(path: Path) -> int:
    """The round of a checkpoint whose contents match its checksum; CheckpointError if not."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != "hpcfl-checkpoint":
                raise CheckpointError(f"{path} is not an hpcfl checkpoint")
            if f.attrs["sha256"] != _digest(f):
                raise CheckpointError(f"{path} is corrupted (checksum mismatch)")
            return int(f.attrs["round"])
    except CheckpointError:
        raise
    except Exception as e:  # h5py raises OSError, KeyError, ValueError on damaged files
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: "
                              f"{one_line(e)})") from None


def load_checkpoint(path: Path, table=None) -> Checkpoint:
    """The shared state; with `table` (a private.PrivateTable), the rows of its hosted clients
    that the checkpoint holds, a chunk at a time (rows are stored per client id: any rank count
    resumes; the others stay unwritten, at the start value). A checkpoint of hpcfl <= 0.2.0
    holds every client's row, in id order."""
    with h5py.File(path, "r", locking=False) as f:
        if table is not None:
            first, stop = table.hosted.start, table.hosted.stop
            ids = (f["private_ids"][:] if "private_ids" in f else
                   np.arange(len(f["private"][table.names[0]]) if table.names else 0))
            lo, hi = np.searchsorted(ids, [first, stop])
            step = rows_per_chunk((table.width,))
            for i in range(lo, hi, step):
                j = min(i + step, hi)
                table.put(ids[i:j], {k: f["private"][k][i:j] for k in table.names})
        return Checkpoint(round=int(f.attrs["round"]), config=str(f.attrs["config"]),
                          elapsed_s=float(f.attrs["elapsed_s"]),
                          shared={k: v[...] for k, v in f["shared"].items()})
