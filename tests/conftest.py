import fcntl
import logging
import os
import pickle
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
import torch

from hpcfl.config import load_config


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg): one worker per core, at most 4 (most tests are one thread; the
    MPI tests start 2-4 ranks of their own)."""
    return max(1, min(4, usable_cores()))


# The tests that take tens of seconds (pytest --durations), started first so that the xdist
# workers finish together instead of one of them starting the default run at the end.
LONG = ("test_main.py::test_default_run_reaches_090",
        "test_testbed.py::",
        "test_attack_cli.py::test_the_no_argument_attack",
        "test_compile.py::test_a_compiled_local_step",
        "test_hypernet_attack.py::test_the_adaptive_attack_beats",
        "test_bench.py::test_the_suite_keeps_its_budget",
        "test_mpi.py::test_sigterm_while_a_checkpoint",
        "test_mpi.py::test_a_large_sampled_population",
        "test_mpi.py::test_kill9_of_the_job",
        "test_mpi.py::test_every_rank_trains_a_share",
        "test_mpi.py::test_an_attack_spread",
        "test_mpi.py::test_one_rank_killed",
        "test_slice_clip.py::test_both_engine_paths",
        "test_prepare.py::test_a_paper_job",
        "test_defenses.py::test_every_defense",
        "test_dp.py::test_each_dp_baseline_learns",
        "test_gifd.py::test_gifd_beats",
        "test_lpm.py::test_a_bf16_run")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(name in item.nodeid for name in LONG))  # stable


def pytest_configure(config):
    """Workers side by side share the cores: each one's in-process torch gets its share of
    them (runs set engine.threads themselves)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, usable_cores() // workers))

# A run small enough for a unit test: 6 digits clients, 2 rounds of 1 local epoch.
TINY = ["data.num_clients=6", "data.classes_per_client=3", "train.rounds=2",
        "train.local_epochs=1", "algorithm.head_epochs=1", "output.progress=none",
        "train.device=cpu"]


# A run interrupted and resumed by tests/test_mpi.py and tests/test_resume.py, checkpointed every 2
# of its 8 rounds; `reference` is its uninterrupted numbers.
RESUMED = [*TINY, "train.rounds=8", "train.local_epochs=2", "output.checkpoint_every=2"]


def once(tmp_path_factory, name: str, make):
    """`make(folder)`'s value, computed by one pytest process of the session (xdist workers
    share it through the base temporary folder they have in common, under a file lock)."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the workers' folders are popen-gw0, popen-gw1, ... in it
    folder = root / f"once-{name}"
    with open(root / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "value.pkl").exists():
            folder.mkdir(exist_ok=True)
            value = make(folder)
            (folder / "value.pkl").write_bytes(pickle.dumps(value))
        return pickle.loads((folder / "value.pkl").read_bytes())


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """RESUMED run once, uninterrupted, in this process (any rank count gives these numbers)."""
    from hpcfl.main import main

    def make(out):
        assert main([*RESUMED, f"output.dir={out}", "output.name=ref"]) == 0
        return results(out / "ref.h5")
    return once(tmp_path_factory, "reference", make)


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
             pin_threads: bool = True, timeout: float = 240) -> dict[str, dict]:
    """Every config (name -> overrides, plus `common`, which must set output.dir), one after
    another in ONE job of `ranks` ranks (tests/many.py), each written to output.name=<name>;
    their results() by name."""
    argv = []
    for name, over in configs.items():
        argv += [*common, *over, f"output.name={name}", "--"]
    r = run_mpi(ranks, *argv, module="many", pin_threads=pin_threads, timeout=timeout)
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
    """PIDs of the Python ranks (not mpiexec or its proxies) with the argument `marker` (the
    test's own output.dir=...: tests run side by side)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if argv[1:3] == ["-m", "hpcfl.main"] and marker in argv:
            pids.append(int(d.name))
    return pids
