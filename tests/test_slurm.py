"""On a real Slurm (tests/slurm/start_local_slurm.sh starts a one-node one; .ci/run does): srun
starts the ranks of one run, and so does mpiexec inside an allocation; slurm/sweep.sbatch runs a
sweep as an array job, a run signalled before its time limit requeues itself and resumes to the
numbers of an uninterrupted run, and an srun whose MPI plugin (SLURM_MPI_TYPE) does not match
the library stops with exit code 2.

Without Slurm these tests skip, unless HPCFL_REQUIRE_SLURM=1 (set by .ci/run) makes that a
failure."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml

from analysis.summarize import main as summarize

from hpcfl.config import load_config
from hpcfl.loop import default_name

from .conftest import TINY, launch, max_diff, mpiexec, results, wait_for_rows

ROOT = Path(__file__).resolve().parent.parent
# one worker runs them one after another: the one-node cluster has a CPU per core, and a job
# of the next test would wait for the CPUs of the last
pytestmark = pytest.mark.xdist_group("slurm")
# the Python of this test session first on PATH: srun and sbatch pass the environment on
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
# the batch scripts as README.md and docs/cluster.md show them, unmodified: their defaults (no
# GPU, one core a rank) run on a CPU-only node (before, they asked for a GPU and 4 cores, and
# sbatch refused with "Invalid generic resource (gres) specification")
ON_THIS_NODE: list[str] = []


def slurm_up() -> str:
    if not shutil.which("sbatch"):
        return "no Slurm commands (bash tests/slurm/start_local_slurm.sh starts a local one)"
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if r.returncode or not re.search(r"idle|mixed|allocated", r.stdout):
        return f"Slurm does not answer or has no usable node ({r.stderr.strip() or r.stdout})"
    return ""


@pytest.fixture(scope="module", autouse=True)
def slurm():
    why = slurm_up()
    if why and os.environ.get("HPCFL_REQUIRE_SLURM") == "1":
        pytest.fail(f"HPCFL_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(why)


def srun(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["srun", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=240)


def job_states(job: str) -> list[str]:
    """The state of the job, or of each element of an array job."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                         text=True).stdout
    return re.findall(r"JobState=(\S+)", out) or ["UNKNOWN"]


def wait_for(job: str, timeout: float = 240) -> list[str]:
    """Poll until no part of the job is pending or running (sbatch --wait polls every 10 s or
    so, which here would double the test's time)."""
    end = time.time() + timeout
    while time.time() < end:
        states = job_states(job)
        if not set(states) & {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"}:
            return states
        time.sleep(0.5)
    raise TimeoutError(f"Slurm job {job}: {states}")


def sbatch(*args: str, cwd) -> str:
    return subprocess.run(["sbatch", "--parsable", *ON_THIS_NODE, *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_srun_starts_the_ranks_of_one_run(tmp_path):
    r = srun("--mpi=pmi2", "-n", "2", sys.executable, "-m", "hpcfl.main", *TINY,
             f"output.dir={tmp_path}", "output.name=two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "two.h5", "r") as f:
        assert f.attrs["status"] == "completed" and f.attrs["world_size"] == 2
        assert f["timing/compute_s"].shape == (2, 2)


def test_mpiexec_in_an_allocation_runs_and_the_scripts_take_srun_s_plugin_from_a_variable(
        tmp_path):
    """`mpiexec -n $SLURM_NTASKS` inside an allocation starts the ranks of one run (its ranks
    see SLURM_STEP_NUM_TASKS=1, Hydra's one launcher per node: before, hpcfl stopped there);
    slurm/run.sbatch runs srun with the plugin SLURM_MPI_TYPE names (before: --mpi=pmi2 in the
    script), and one the library does not speak (none: each task sees a world of 1) is exit 2
    with one line per rank, and no results file."""
    out = f"output.dir={tmp_path}"
    inside = sbatch("-n", "2", f"--output={tmp_path}/mpiexec-%j.out", "--wrap",
                    f"{mpiexec()} -n $SLURM_NTASKS {sys.executable} -m hpcfl.main "
                    f"{' '.join(TINY)} {out} output.name=inside", cwd=tmp_path)
    plugin = subprocess.run(["sbatch", "--parsable", *ON_THIS_NODE, "--ntasks-per-node=2",
                             str(ROOT / "slurm" / "run.sbatch"), *TINY, out, "output.name=x"],
                            cwd=tmp_path, env=dict(ENV, SLURM_MPI_TYPE="none"),
                            capture_output=True, text=True, check=True).stdout.strip()
    states = wait_for(inside), wait_for(plugin)
    log = (tmp_path / f"mpiexec-{inside}.out").read_text()
    assert states[0] == ["COMPLETED"], log
    with h5py.File(tmp_path / "inside.h5", "r") as f:
        assert f.attrs["status"] == "completed" and f.attrs["world_size"] == 2
    log = (tmp_path / f"hpcfl-{plugin}.out").read_text()
    assert states[1] == ["FAILED"], log
    lines = [x for x in log.splitlines() if x.startswith("hpcfl:") and "error" in x]
    assert lines and all("srun started 2 tasks but MPI sees 1" in x for x in lines), log
    assert "Traceback" not in log and not (tmp_path / "x.h5").exists()


def test_an_array_job_runs_every_point_of_a_sweep_and_summarize_reads_them(tmp_path, capsys):
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(yaml.safe_dump(dict(
        base=dict(data=dict(num_clients=4), train=dict(rounds=2, local_steps=1, device="cpu"),
                  algorithm=dict(head_epochs=0), output=dict(progress="none")),
        grid={"algorithm.name": ["fedavg", "hyperfl"], "train.seed": [0, 1]})))
    job = sbatch("--array=0-3", str(ROOT / "slurm" / "sweep.sbatch"), str(sweep), cwd=tmp_path)
    states = wait_for(job)
    logs = "".join(p.read_text() for p in tmp_path.glob("hpcfl-sweep-*.out"))
    assert states == ["COMPLETED"] * 4, logs
    assert len(list(tmp_path.glob("hpcfl-sweep-*_[0-3].out"))) == 4
    for i in range(4):
        with h5py.File(tmp_path / "runs" / f"grid-{i:03d}.h5", "r") as f:
            assert f.attrs["status"] == "completed"
            assert list(f["metrics/round"][:]) == [1, 2]
    assert summarize([str(tmp_path / "runs"), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert out.count("completed") == 4 and "±" in out


def test_a_signalled_batch_run_requeues_itself_and_ends_as_an_uninterrupted_run(tmp_path):
    args = [*TINY, "train.rounds=12", "algorithm.name=hyperfl"]
    ref = launch(None, *args, f"output.dir={tmp_path / 'ref'}", "output.name=ref")
    job = sbatch(str(ROOT / "slurm" / "run.sbatch"), *args, cwd=tmp_path)
    path = tmp_path / "runs" / f"{default_name(load_config(None, args))}.h5"  # no name given
    try:
        end = time.time() + 120
        while not path.exists() and time.time() < end:
            time.sleep(0.2)
        wait_for_rows(path, 2, ref)  # (ref: a process that must stay alive meanwhile)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        states = wait_for(job)
        assert ref.wait(timeout=240) == 0
    finally:
        subprocess.run(["scancel", job])
        ref.kill()
    log = (tmp_path / f"hpcfl-{job}.out").read_text()
    assert states == ["COMPLETED"], log
    assert f"requeued Slurm job {job}" in log and "start 1," in log, log
    with h5py.File(path, "r") as f:
        assert 2 <= f.attrs["resumed_from_round"] < 12
    assert max_diff(results(path), results(tmp_path / "ref" / "ref.h5")) == 0.0  # bit for bit
