"""What every hpcfl command does on failure, and what a run raises besides ConfigError.

Exit codes (docs/cluster.md): 0 done or preempted; 2 a user mistake (one line, no traceback, no
results file); 3 diverged; 4 the round's Allreduce did not finish within
train.collective_timeout_s (hpcfl.world's watchdog: one line, every rank aborted, resumable); 1 a
crash (every rank aborted). A preempted Slurm job requeues itself.
"""
from __future__ import annotations

import os
import subprocess
import sys

from .config import ConfigError
from .world import World


class Diverged(Exception):
    """A round whose loss or shared update is not finite: the run stops, exit code 3."""


class Command:
    """A command line's handling of failure, the same for every hpcfl command: a ConfigError
    (a user mistake) is one line on stderr (rank 0's, once the world exists) and exit code 2;
    a run that diverged (every rank sees it in the same round) one line and exit code 3; any
    other exception on one rank of several aborts every rank rather than hang the job.

        cmd = Command("hpcfl.attack")
        with cmd:
            world = cmd.start(device)   # after parsing: errors before it print on every rank
            ...
        if cmd.code: return cmd.code
    """

    def __init__(self, prog: str):
        self.prog, self.world, self.code = prog, None, 0

    def start(self, device: str, threads: int = 1) -> World:
        self.world = World(device, threads)
        return self.world

    def __enter__(self) -> "Command":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            return False
        for error, code, what in ((ConfigError, 2, "error"), (Diverged, 3, "diverged")):
            if issubclass(kind, error):
                alone = (self.world is not None and self.world.size > 1
                         and error is ConfigError and not exc.every_rank)
                if alone:  # the other ranks do not know: they may be waiting in a collective
                    self.world.abort(code, f"{self.prog}: {what}: {self.world.name}: {exc}")
                if self.world is None or self.world.is_main:
                    print(f"{self.prog}: {what}: {exc}", file=sys.stderr)
                self.code = code
                return True
        if self.world is not None:
            self.world.abort_on_exit(exc)
        return False


def requeue_own_job() -> str | None:
    """Put this Slurm job (an array element is a job of its own id) back in the queue, so that
    it resumes from the checkpoint just written: only where the batch script asks for it with
    HPCFL_REQUEUE=1 (slurm/*.sbatch do), since an interactive srun cannot be requeued. Called by
    rank 0 as its last act: Slurm ends the job's processes right away. A line for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("HPCFL_REQUEUE") != "1" or not job:
        return None
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                           timeout=60)
        why = r.stderr.strip() if r.returncode else ""
    except (OSError, subprocess.SubprocessError) as e:
        why = str(e)
    return (f"scontrol requeue {job} failed ({why}): submit the same job again to resume"
            if why else f"requeued Slurm job {job}: it resumes from the checkpoint")
