import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcfl.config import load_config

# A run small enough for a unit test: 6 digits clients, 2 rounds of 1 local epoch.
TINY = ["data.num_clients=6", "data.classes_per_client=3", "train.rounds=2",
        "train.local_epochs=1", "algorithm.head_epochs=1", "output.progress=none",
        "train.device=cpu"]


# A run interrupted and resumed by tests/test_mpi.py and tests/test_resume.py, checkpointed every 2
# of its 8 rounds; `reference` is its uninterrupted numbers.
RESUMED = [*TINY, "train.rounds=8", "train.local_epochs=2", "output.checkpoint_every=2"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """RESUMED run once, uninterrupted, in one process (any rank count gives these numbers)."""
    out = tmp_path_factory.mktemp("ref")
    r = run_mpi(None, *RESUMED, f"output.dir={out}", "output.name=ref")
    assert r.returncode == 0, r.stderr
    return results(out / "ref.h5")


def run_cli(*args: str, cwd=None, timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    """`python -m hpcfl.main ARGS` in a fresh process, as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "hpcfl.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def logging_to_stderr():
    """What the tools' logging.basicConfig gives them in a process of their own (INFO lines on
    stderr), which pytest's own handlers prevent in this one: a log line counts as a line too."""
    root, handler = logging.getLogger(), logging.StreamHandler(sys.stderr)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m hpcfl.main ARGS` in this process (hpcfl.main.main), its stdout and stderr (log
    lines included) as a process's: for runs whose test is not about the process itself
    (signals, a kill, MPI), which saves starting Python, torch and the data again."""
    from hpcfl.main import main

    capsys.readouterr()
    with logging_to_stderr():
        code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["hpcfl.main", *args], code, out, err)


def evaluate_each(algo, shared, private: dict, data) -> np.ndarray:
    """(clients, 3): correct, summed loss, test size of every client in `private`, one client
    at a time (engine.evaluate_client): the reference the run's stacked evaluation must give."""
    from hpcfl.engine import evaluate_client

    table = np.zeros((len(data.clients), 3))
    for cid, state in private.items():
        c = data.clients[cid]
        table[cid] = (*evaluate_client(algo, {**shared, **state}, c), c.num_test)
    return table


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str):
        return load_config(None, [*TINY, *overrides])
    return make


def mpiexec() -> str:
    """The mpiexec beside this Python (the `mpich` wheel of the [test] extra), or on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail("no mpiexec: install the test extra, pip install -e '.[test]'")
    return found


def launch(ranks: int | None, *args: str, module: str = "hpcfl.main", pin_threads: bool = True,
           **popen) -> subprocess.Popen:
    """`mpiexec -n RANKS python -m MODULE ARGS` (plain `python -m MODULE ARGS` if RANKS is
    None; module "many": tests/many.py, several runs in one process) in its own session, so
    that the whole job can be killed at once. OMP_NUM_THREADS=1 unless `pin_threads` is False
    (hpcfl's engine.threads decides either way)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if not pin_threads:
        env.pop("OMP_NUM_THREADS")
    cmd = [sys.executable, *(["-m", module] if module != "many" else
                             [str(Path(__file__).parent / "many.py")]), *args]
    if ranks is not None:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen)


def run_mpi(ranks: int | None, *args: str, timeout: float = 240, module: str = "hpcfl.main",
            pin_threads: bool = True) -> subprocess.CompletedProcess:
    proc = launch(ranks, *args, module=module, pin_threads=pin_threads)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung job must not outlive the test (and slow others)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_each(ranks: int | None, configs: dict[str, list[str]], *common: str,
             pin_threads: bool = True) -> dict[str, dict]:
    """Every config (name -> overrides, plus `common`, which must set output.dir), one after
    another in ONE job of `ranks` ranks (tests/many.py), each written to output.name=<name>;
    their results() by name."""
    argv = []
    for name, over in configs.items():
        argv += [*common, *over, f"output.name={name}", "--"]
    r = run_mpi(ranks, *argv, module="many", pin_threads=pin_threads)
    assert r.returncode == 0, r.stderr
    out = next(a for a in common if a.startswith("output.dir=")).split("=", 1)[1]
    return {name: results(Path(out) / f"{name}.h5") for name in configs}


def wait_for_rows(path, rows: int, proc, timeout=180):
    """Read the results file while the run writes it, until it has `rows` evaluations."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            with h5py.File(path, "r") as f:
                if len(f["metrics/round"]) >= rows:
                    return
        except (OSError, KeyError):
            pass
        time.sleep(0.1)
    raise TimeoutError(path)


RESULT_METRICS = ("round", "test_acc_mean", "test_acc_weighted", "test_loss_mean", "train_loss")


def results(path) -> dict[str, np.ndarray]:
    """The numbers of a run that must not depend on ranks or interruptions (no wall times), and
    its final shared state, from the checkpoint written after the last round."""
    with h5py.File(path, "r") as f:
        out = {k: f["metrics"][k][:] for k in RESULT_METRICS}
        out["clients/test_acc"] = f["clients/test_acc"][:]
        out["status"] = f.attrs["status"]
    ckpt = Path(str(path).replace(".h5", ".ckpt.h5"))
    with h5py.File(ckpt, "r") as f:
        out["private_ids"] = f["private_ids"][:]
        for group in ("shared", "private"):
            for k in f[group]:
                out[f"{group}/{k}"] = f[group][k][:]
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a["status"] == b["status"] == "completed"
    assert np.array_equal(a["round"], b["round"])
    for k in a:
        assert np.shape(a[k]) == np.shape(b[k]), k
    return max(float(np.abs(a[k].astype(float) - b[k].astype(float)).max(initial=0.0))
               for k in a if k != "status")


def rank_pids(marker: str) -> list[int]:
    """PIDs of the Python ranks (not mpiexec or its proxies) whose arguments contain `marker`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if argv[1:3] == ["-m", "hpcfl.main"] and any(marker in a for a in argv):
            pids.append(int(d.name))
    return pids
