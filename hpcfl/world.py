"""The processes of a run: mpi4py COMM_WORLD, or a single process with the same interface.

The world knows ranks, devices, signals and buffers; it never sees a model. Collectives take
contiguous host buffers (numpy, or CPU tensors copied from the device), never pickled tensors
(docs/ARCHITECTURE.md, "Invariants"). What a command does on failure is hpcfl.cli's; where
clients live, hpcfl.placement's.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

import numpy as np
import torch

from .config import ConfigError
from .oneline import one_line

log = logging.getLogger("hpcfl")

# Slurm sends SIGTERM at the time limit and on preemption, and --signal=USR1/USR2@T before it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
TIMED_OUT = 4  # exit code of a run stopped by the watchdog (hpcfl.cli)


def _import_mpi():
    """mpi4py's MPI module, or None (with the reason) when no MPI library can be loaded."""
    try:
        import mpi4py
        mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
        from mpi4py import MPI
        return MPI, ""
    except (ImportError, RuntimeError, OSError) as e:
        return None, one_line(e)


class _Refused:
    """A ConfigError's line, on its way from rank 0 to the others."""

    def __init__(self, line: str):
        self.line = line


def deterministic_kernels() -> None:
    """CUDA kernels that give the same numbers on every run and every rank count: cuDNN's
    deterministic algorithms without autotuning, a fixed cuBLAS workspace (set before cuBLAS's
    first use), and torch's deterministic mode, which also makes index_add_ and scatter_add_
    deterministic on CUDA and raises, naming the op, where only a nondeterministic kernel exists
    (a run that cannot be reproduced stops rather than reporting numbers it cannot give again)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True)


class _Arrivals:
    """Who has reached round `rnd`'s Allreduce, for the watchdog's line. Every rank sends its
    note to rank 0, which answers each note once it has it: rank 0 learns who arrived, the
    others whether rank 0 did, and no rank sends to one that has not just shown it is alive (a
    send to a dead node can end a process inside MPI, with MPI's message instead of ours).
    2 (size - 1) messages of 8 bytes a round."""

    def __init__(self, comm, rank: int, size: int, rnd: int):
        self.comm, self.rank = comm, rank
        self.note, self.got = np.array([rnd], np.int64), np.zeros((size, 1), np.int64)
        self.waiting = {r: comm.Irecv(self.got[r], source=r)
                        for r in (range(1, size) if rank == 0 else [0])}
        self.sent = [] if rank == 0 else [comm.Isend(self.note, dest=0)]

    def poll(self) -> None:
        for r, request in list(self.waiting.items()):
            if request.Test():
                del self.waiting[r]
                if self.rank == 0:
                    self.sent.append(self.comm.Isend(self.note, dest=r))

    def silent(self) -> list[int]:
        return sorted(self.waiting)

    def finish(self) -> None:
        """After the Allreduce, which every rank reached: every note was sent, so the waits
        end now."""
        for r, request in list(self.waiting.items()):
            request.Wait()
            del self.waiting[r]
            if self.rank == 0:
                self.sent.append(self.comm.Isend(self.note, dest=r))
        for request in self.sent:
            request.Wait()


class World:
    """rank / size / node-local rank / device of this process, and the run's collectives."""

    def __init__(self, device: str = "auto", threads: int = 1):
        self.MPI, why = _import_mpi()
        if self.MPI is None:
            log.info("MPI unavailable (%s): running as a single process", why)
            self.comm, self.rank, self.size, self.local_rank, self.local_size = None, 0, 1, 0, 1
        else:
            self.comm = self.MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
            local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            local.Free()
        self._check_slurm()
        self._set_threads(threads)
        self.device = self.agree(lambda: self._pick_device(device))  # e.g. no CUDA on one node
        self.stop_requested = False
        self.timeout_s = 0.0  # the watchdog, off until watch_collectives

    def _check_slurm(self) -> None:
        # srun starting N tasks that each see a smaller world means srun and the MPI library
        # disagree on how to start ranks: every task would run the whole job alone. Fewer step
        # tasks than ranks is no mismatch: mpiexec inside an allocation (MPICH's Hydra, Open
        # MPI's mpirun) starts one launcher per node with srun, and its ranks inherit that
        # step's SLURM_STEP_NUM_TASKS, the number of nodes.
        step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS")
        if step_tasks and step_tasks.isdigit() and int(step_tasks) > self.size:
            raise ConfigError(f"srun started {step_tasks} tasks but MPI sees {self.size}: "
                              "srun's MPI plugin must match the MPI library: srun --mpi=pmi2 "
                              "(MPICH, Intel MPI, the mpich wheel) or --mpi=pmix (Open MPI); "
                              "slurm/*.sbatch take it from SLURM_MPI_TYPE")

    def _set_threads(self, threads: int) -> None:
        """`threads` per rank (engine.threads); 0: Slurm's CPUs per task, else the node's cores
        shared among its ranks (a count that changes with the number of ranks, and with it the
        last bits of a run)."""
        if threads == 0:
            per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
            threads = (int(per_task) if per_task.isdigit() else
                       max(1, len(os.sched_getaffinity(0)) // self.local_size))
        torch.set_num_threads(threads)

    def _pick_device(self, want: str) -> torch.device:
        if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {want} asked for, but CUDA is not available")
        if want.startswith("cuda:"):
            dev = torch.device(want)
        else:  # several ranks may share one GPU
            dev = torch.device("cuda", self.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        deterministic_kernels()
        return dev

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def synchronize(self) -> None:
        """Wait for this rank's device, so that a timer read next measures finished work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def catch_stop_signals(self) -> None:
        """SIGTERM / SIGUSR1 / SIGUSR2 only set a flag: the round in flight finishes, then the
        ranks agree (in the round's Allreduce) to checkpoint and stop."""
        def handler(signum, frame):
            if not self.stop_requested:
                log.info("rank %d got %s: stopping after this round", self.rank,
                         signal.Signals(signum).name)
            self.stop_requested = True
        self._previous_handlers = {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def release_stop_signals(self) -> None:
        """Back to the handlers from before catch_stop_signals (a run inside a longer program,
        e.g. python -m hpcfl.attack, must not leave SIGTERM ignored)."""
        for s, h in getattr(self, "_previous_handlers", {}).items():
            signal.signal(s, h)

    def watch_collectives(self, seconds: float) -> None:
        """The watchdog (train.collective_timeout_s; 0: off): a collective of the run that has
        not finished after `seconds` stops every rank with one line (exit code 4) instead of
        waiting forever for a node that died or a link that was cut. Collective: every rank."""
        if self.comm is None or not seconds:
            return
        self.timeout_s = seconds
        # the round's arrival notes travel apart from the run's own messages (a checkpoint's
        # Recv takes any tag)
        self._notes = self.comm.Dup()
        self._hosts = self.comm.allgather(socket.gethostname())

    def allreduce_sum_(self, buf: torch.Tensor, rnd: int = 0) -> None:
        """Sum `buf` (float32, contiguous) over all ranks, in place: the one collective of a
        round (`rnd`). Staged through host memory: the pip MPI wheels are not CUDA-aware and
        segfault on device pointers."""
        if self.comm is None:
            return
        host = self.staging(buf) if buf.is_cuda else buf.detach()
        if buf.is_cuda:
            host.copy_(buf)  # waits for the round's kernels; then a DMA into pinned memory
        if self.timeout_s:
            self._watched_allreduce(host.numpy(), rnd)
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, host.numpy(), op=self.MPI.SUM)
        if buf.is_cuda:
            # Queued on the stream: what follows on the device sees the sum. The next write to
            # `host` is next round's copy above, queued behind this one.
            buf.copy_(host, non_blocking=True)

    def _watched_allreduce(self, arr: np.ndarray, rnd: int) -> None:
        """The round's Allreduce under the watchdog: nonblocking, beside the arrival notes that
        name, if it cannot finish, the ranks that never reached it."""
        arrivals = _Arrivals(self._notes, self.rank, self.size, rnd)
        reduced = self.comm.Iallreduce(self.MPI.IN_PLACE, arr, op=self.MPI.SUM)
        self._wait(reduced, f"round {rnd}: the Allreduce", arrivals)
        arrivals.finish()

    def _wait(self, request, what: str, arrivals: "_Arrivals") -> None:
        """Poll `request` until it completes or the watchdog's time is up; then abort every
        rank with one line: rank 0 names the ranks it has not heard from; another rank does so
        only if rank 0 is one of them, else it leaves the line to rank 0 (a job's log gets one
        line, not one per rank) and aborts by itself only after twice the time."""
        start, nap = time.monotonic(), 1e-5
        while not request.Test():
            arrivals.poll()
            waited = time.monotonic() - start
            silent = arrivals.silent()
            if waited > self.timeout_s and (self.rank == 0 or 0 in silent
                                             or waited > 2 * self.timeout_s):
                names = ", ".join(f"rank {r} ({self._hosts[r]})" for r in silent) or (
                    "none (every rank reached it)" if self.rank == 0 else
                    f"none that rank {self.rank} knows of (rank 0 reached it)")
                self.abort(TIMED_OUT, f"hpcfl: {what} did not finish within {self.timeout_s:g} "
                           f"s (train.collective_timeout_s); not heard from: {names}; every "
                           "rank stopped: rerun the same command to resume from the last "
                           "checkpoint")
            time.sleep(nap)  # short naps first: a healthy round finishes within microseconds
            nap = min(2 * nap, 0.01)

    def staging(self, buf: torch.Tensor) -> torch.Tensor:
        """The pinned (page-locked) host buffer through which a CUDA buffer like `buf` is
        reduced, allocated once and kept: a copy from pageable memory goes through a bounce
        buffer at a fraction of the bandwidth, and pinning is slow, so not once a round.
        Only for CUDA buffers: pinning needs CUDA."""
        held = getattr(self, "_staging", None)
        if held is None or held.shape != buf.shape or held.dtype != buf.dtype:
            held = self._staging = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        return held

    def reduce_sum_to_main(self, arr: np.ndarray) -> np.ndarray | None:
        """Elementwise sum of `arr` over ranks, on rank 0 (ranks fill disjoint entries)."""
        if self.comm is None:
            return arr
        arr = np.ascontiguousarray(arr)
        out = np.empty_like(arr) if self.is_main else None
        self.comm.Reduce(arr, out, op=self.MPI.SUM, root=0)
        return out

    def gather_rows_to_main(self, rows: np.ndarray, counts: list[int]) -> np.ndarray | None:
        """Stack every rank's rows (rank r has counts[r] rows of equal width) on rank 0."""
        if self.comm is None:
            return rows
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        width = rows.shape[1]
        out = np.empty((sum(counts), width), np.float32) if self.is_main else None
        sizes = [c * width for c in counts]
        self.comm.Gatherv(rows, [out, sizes, None, self.MPI.FLOAT] if self.is_main else None,
                          root=0)
        return out

    def exchange(self, send: list[np.ndarray]) -> list[np.ndarray]:
        """send[r]: float32 rows (n_r, width) for rank r; returns the rows every rank sent here,
        by source rank: one Alltoall of the counts, one Alltoallv of the rows."""
        if self.comm is None:
            return list(send)
        width = send[0].shape[1]
        counts = np.array([len(s) for s in send], dtype=np.int64)
        received = np.empty_like(counts)
        self.comm.Alltoall(counts, received)
        out = np.empty((int(received.sum()), width), np.float32)
        self.comm.Alltoallv([np.ascontiguousarray(np.concatenate(send), dtype=np.float32),
                             counts * width, None, self.MPI.FLOAT],
                            [out, received * width, None, self.MPI.FLOAT])
        return np.split(out, np.cumsum(received)[:-1])

    def send_to_main(self, rows: np.ndarray) -> None:
        """Rows (float32) to rank 0, which takes them with receive_from (point to point: rank 0
        writes a large file one piece at a time, in order, holding one piece)."""
        self.comm.Send(np.ascontiguousarray(rows, dtype=np.float32), dest=0)

    def receive_from(self, rank: int, shape: tuple[int, ...]) -> np.ndarray:
        rows = np.empty(shape, np.float32)
        self.comm.Recv(rows, source=rank)
        return rows

    def gather_to_main(self, value) -> list | None:
        """Every rank's small Python object (e.g. an attack's results), in rank order, on rank
        0; None elsewhere. Pickled: not for the round's buffers."""
        return [value] if self.comm is None else self.comm.gather(value, root=0)

    def from_main(self, value):
        """Rank 0's value of a small Python object (a name, a decision) on every rank."""
        return value if self.comm is None else self.comm.bcast(value, root=0)

    def on_main(self, compute):
        """compute() run on rank 0 alone, its result on every rank; a ConfigError there is
        raised on every rank (the same one line), so that all stop together."""
        result = None
        if self.is_main:
            try:
                result = compute()
            except ConfigError as e:
                result = _Refused(str(e))
        result = self.from_main(result)
        if isinstance(result, _Refused):
            raise ConfigError(result.line, every_rank=True)
        return result

    def agree(self, compute):
        """compute() on every rank; a ConfigError on any rank is raised on all of them (one
        line: the first failing rank's, named when not every rank failed), so that no rank
        waits in a collective for one that has stopped: a prepared file damaged on one node,
        weights missing on one node, no CUDA on one node."""
        result, line = None, None
        try:
            result = compute()
        except ConfigError as e:
            line = str(e)
        if self.comm is None:
            if line is not None:
                raise ConfigError(line, every_rank=True)
            return result
        lines = self.comm.allgather(line)
        failed = [(r, x) for r, x in enumerate(lines) if x is not None]
        if failed:
            rank, first = failed[0]
            name = self.comm.allgather(self.name)[rank]
            raise ConfigError(first if len(failed) == self.size else f"{name}: {first}",
                              every_rank=True)
        return result

    @property
    def name(self) -> str:
        """This rank, as a line about it names it: "rank 1 (node07)"."""
        return f"rank {self.rank} ({socket.gethostname()})"

    def abort(self, code: int, line: str) -> None:
        """Print `line` and end every rank now with exit `code` (MPI_Abort). MPI's own report of
        the abort is silenced: `line` already says why, and a job's error is then one line."""
        print(line, file=sys.stderr, flush=True)
        # The launcher (hydra's proxy, slurmstepd) forwards the line from a pipe; an abort
        # right after the write kills the job before it does, 1 time in 5 under mpiexec.
        time.sleep(0.5)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        self.comm.Abort(code)

    def abort_on_exit(self, exc: BaseException) -> None:
        """Make this process abort every rank as it exits with `exc` (MPI_Abort): without it
        the other ranks would wait in the next collective forever."""
        if self.size > 1:
            import mpi4py.run
            mpi4py.run.set_abort_status(exc)

    def hostnames(self) -> list[str]:
        name = socket.gethostname()
        return [name] if self.comm is None else sorted(set(self.comm.allgather(name)))

    def mpi_version(self) -> str:
        return "none" if self.MPI is None else self.MPI.Get_library_version().splitlines()[0]
