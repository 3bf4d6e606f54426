"""Runs that cannot collide or silently diverge: the lock on output.name, the diverged status,
an output folder that cannot be written."""
import os
import signal
import socket
import subprocess
import sys

import h5py
import yaml

from hpcfl.main import main
from hpcfl.sweep import main as sweep

from .conftest import TINY, wait_for_rows


def test_a_second_process_on_a_running_name_stops_and_a_dead_holder_blocks_nothing(
        tmp_path, capsys):
    args = [*TINY, "train.rounds=12", f"output.dir={tmp_path}", "output.name=same"]
    first = subprocess.Popen([sys.executable, "-m", "hpcfl.main", *args],
                             env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(tmp_path / "same.h5", 1, first)
        assert main(args) == 2  # while the first one runs
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"host {socket.gethostname()} pid {first.pid}" in err
        out, _ = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, out
    with h5py.File(tmp_path / "same.h5", "r") as f:  # intact: every round once, completed
        assert f.attrs["status"] == "completed" and f.attrs["world_size"] == 1
        assert list(f["metrics/round"][:]) == list(range(1, 13))
    assert not (tmp_path / "same.lock").exists()

    # a holder killed with SIGKILL leaves its lock file behind, naming it; the lock is gone
    lock = tmp_path / "next.lock"
    holder = subprocess.run([sys.executable, "-c", (
        "import os, signal, pathlib; from hpcfl.lock import RunLock; "
        f"RunLock(pathlib.Path({str(tmp_path / 'next.h5')!r})).acquire(); "
        "os.kill(os.getpid(), signal.SIGKILL)")])
    assert holder.returncode == -signal.SIGKILL and "pid" in lock.read_text()
    assert main([*TINY, "train.rounds=1", f"output.dir={tmp_path}", "output.name=next"]) == 0
    assert not lock.exists()


def test_a_diverging_run_stops_at_its_round_with_exit_3_and_a_sweep_does_not_retry_it(
        tmp_path, capsys):
    # round 1 trains from a finite start; its step of lr 1e30 makes round 2's loss NaN/inf
    base = dict(data=dict(num_clients=6, classes_per_client=3),
                train=dict(rounds=4, local_steps=1, lr=1e30, device="cpu"),
                algorithm=dict(name="fedavg"),
                output=dict(dir=str(tmp_path), checkpoint_every=1, progress="none"))
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(dict(base=base, grid={"train.seed": [0]})))
    assert sweep([str(spec), "--index", "0"]) == 3
    err = capsys.readouterr().err
    assert "hpcfl.sweep: diverged: round 2:" in err and "Traceback" not in err
    with h5py.File(tmp_path / "s-000.h5", "r") as f:
        assert f.attrs["status"] == "diverged"
        assert list(f["metrics/round"][:]) == [1]
    with h5py.File(tmp_path / "s-000.ckpt.h5", "r") as f:
        assert f.attrs["round"] == 1  # nothing checkpointed past the last finite round
    assert sweep([str(spec), "--index", "0"]) == 0
    assert "already diverged, not run again" in capsys.readouterr().out


def test_an_output_folder_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert main([*TINY, f"output.dir={tmp_path / 'a_file' / 'runs'}", "output.name=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpcfl: error: output.dir: cannot write to") and "\n" not in err
