"""Checkpoints and resume in one process: a run stopped in any way and rerun gives the numbers of
a run that never stopped, bit for bit, and never trains on a damaged checkpoint."""
import os
import signal

import h5py
import numpy as np

from .conftest import RESUMED, TINY, launch, max_diff, results, run_main, wait_for_rows

ARGS = RESUMED  # the runs the `reference` fixture (conftest) ran uninterrupted



def test_kill9_then_rerun_gives_identical_results(tmp_path, reference, capsys):
    args = [*ARGS, f"output.dir={tmp_path}", "output.name=k"]
    proc = launch(None, *args)
    wait_for_rows(tmp_path / "k.h5", 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with h5py.File(tmp_path / "k.h5") as f:
        assert f.attrs["status"] == "running"
    r = run_main(capsys, *args)  # the rerun: in this process
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert max_diff(results(tmp_path / "k.h5"), reference) == 0.0


def test_sigterm_checkpoints_exits_0_preempted_then_resumes(tmp_path, reference, capsys):
    args = [*ARGS, f"output.dir={tmp_path}", "output.name=t"]
    proc = launch(None, *args)
    wait_for_rows(tmp_path / "t.h5", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "got SIGTERM" in err and "stopped by a signal" in out
    with h5py.File(tmp_path / "t.h5") as f, h5py.File(tmp_path / "t.ckpt.h5") as c:
        assert f.attrs["status"] == "preempted"
        assert c.attrs["round"] == f["timing/round"][-1] >= f["metrics/round"][-1] >= 2
    r = run_main(capsys, *args)  # the rerun: in this process
    assert r.returncode == 0, r.stderr
    assert max_diff(results(tmp_path / "t.h5"), reference) == 0.0


def damage(path, how: str) -> None:
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # flip bytes inside the largest array: only the checksum can tell
        with h5py.File(path, "r") as f:
            ds = max((f["shared"][k] for k in f["shared"]), key=lambda d: d.size)
            offset = ds.id.get_offset() + ds.nbytes // 2
        with open(path, "r+b") as fh:
            fh.seek(offset)
            b = fh.read(4)
            fh.seek(offset)
            fh.write(bytes(x ^ 0x5A for x in b))


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, capsys):
    """Truncated (unreadable) or one flipped byte (checksum mismatch): reported, and the run goes
    on from the previous checkpoint (round 2) to the numbers of an uninterrupted run. The runs
    in this process (hpcfl.main.main)."""
    import shutil
    first = tmp_path / "first"
    assert run_main(capsys, *ARGS, f"output.dir={first}", "output.name=d",
                    "train.rounds=4").returncode == 0
    err = ""
    for how in ("truncate", "flip"):
        shutil.copytree(first, tmp_path / how)
        damage(tmp_path / how / "d.ckpt.h5", how)
        r = run_main(capsys, *ARGS, f"output.dir={tmp_path / how}", "output.name=d")  # go on
        assert r.returncode == 0, r.stderr
        err += r.stderr
    assert "unreadable" in err and "checksum mismatch" in err
    assert err.count("from round 2") == 2
    for how in ("truncate", "flip"):
        assert max_diff(results(tmp_path / how / "d.h5"), reference) == 0.0  # rows 1..8, once


def test_a_damaged_results_file_or_no_usable_checkpoint_stops_with_exit_2(tmp_path, capsys):
    """At resume: a truncated results file (before: a traceback), then both checkpoints
    damaged: each one line, exit 2, and nothing written to any file."""
    args = [*ARGS, "train.rounds=4", f"output.dir={tmp_path}", "output.name=b"]
    assert run_main(capsys, *args).returncode == 0
    intact = (tmp_path / "b.h5").read_bytes()
    files = sorted(tmp_path.glob("b.*"))
    for damaged, line in (("b.h5", "hpcfl: error: output.name: results file "),
                          ("b.ckpt.h5 b.ckpt.prev.h5", "hpcfl: error: no usable checkpoint")):
        (tmp_path / "b.h5").write_bytes(intact)
        for p in damaged.split():
            damage(tmp_path / p, "truncate")
        before = {p: p.read_bytes() for p in files}
        r = run_main(capsys, *args[:-2], "train.rounds=6", *args[-2:])
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), r.stderr
        assert "Traceback" not in r.stderr
        assert {p: p.read_bytes() for p in files} == before
        assert sorted(tmp_path.glob("b.*")) == files


def test_resume_refuses_another_experiment(tmp_path, capsys):
    """In-process (python -m hpcfl.main's main): one run, then each change refused."""
    from hpcfl.main import main
    args = [*ARGS, "train.rounds=2", f"output.dir={tmp_path}", "output.name=e"]
    assert main(args) == 0
    for change, message in (("train.lr=0.1", "train.lr: 0.1 differs from 0.05"),
                            ("algorithm.name=fedavg",
                             "algorithm.name: 'fedavg' differs from 'hyperfl'")):
        capsys.readouterr()
        assert main([*args, change]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_noisy_run_resumes_only_on_the_device_type_that_drew_its_noise(tmp_path, capsys):
    """DP and defense noise come from device generators (CPU and CUDA draw differently): a run
    that drew on CUDA is refused on the CPU with one line, and goes on where it drew."""
    args = [*TINY, "algorithm.name=fedavg", "privacy.defense=dp_gaussian", "privacy.noise=1e-3",
            f"output.dir={tmp_path}", "output.name=d"]
    assert run_main(capsys, *args).returncode == 0
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        assert f.attrs["device"] == "cpu"
        f.attrs["device"] = "cuda:0"  # as a run on a GPU node leaves it
    before = (tmp_path / "d.h5").read_bytes()
    r = run_main(capsys, *args, "train.rounds=3")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert "drew its noise on cuda; resumed on cpu" in r.stderr
    assert (tmp_path / "d.h5").read_bytes() == before
    with h5py.File(tmp_path / "d.h5", "r+") as f:
        f.attrs["device"] = "cpu"
    r = run_main(capsys, *args, "train.rounds=3")
    assert r.returncode == 0, r.stderr


def test_resume_must_needs_a_checkpoint(tmp_path, capsys):
    r = run_main(capsys, *TINY, f"output.dir={tmp_path}", "output.resume=must")
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    assert not any(tmp_path.iterdir())


def test_checkpoint_holds_every_client_keyed_by_id(tmp_path, capsys):
    assert run_main(capsys, *TINY, f"output.dir={tmp_path}", "output.name=c").returncode == 0
    with h5py.File(tmp_path / "c.ckpt.h5") as f:
        assert f.attrs["round"] == 2 and "sha256" in f.attrs
        assert f["private_ids"][:].tolist() == list(range(6))  # all 6 trained
        assert f["private/embedding"].shape == (6, 64)
        assert f["private/head.weight"].shape == (6, 10, 64)
        assert set(f["shared"]) == {k for k in f["shared"] if k.startswith("hypernet.")}
        emb = f["private/embedding"][:]
        f_rows = {k: f["private"][k][:] for k in f["private"]}
    assert not np.allclose(emb[0], emb[1])  # trained apart
    # a checkpoint of hpcfl 0.2 (every client's row, no /private_ids) loads the same rows
    import shutil

    import torch

    from hpcfl.private import PrivateTable
    from hpcfl.store import load_checkpoint
    shutil.copy(tmp_path / "c.ckpt.h5", tmp_path / "old.ckpt.h5")
    with h5py.File(tmp_path / "old.ckpt.h5", "r+") as f:
        del f["private_ids"]
    start = {"embedding": torch.zeros(64), "head.weight": torch.zeros(10, 64),
             "head.bias": torch.zeros(10)}
    now, old = (PrivateTable(start, range(6), "cpu") for _ in range(2))
    load_checkpoint(tmp_path / "c.ckpt.h5", now)
    load_checkpoint(tmp_path / "old.ckpt.h5", old)
    for k, v in now.get(range(6)).items():
        assert torch.equal(v, old.get(range(6))[k]) and np.array_equal(v.numpy(), f_rows[k])


def test_killed_after_its_last_checkpoint_a_rerun_marks_it_completed(tmp_path, capsys):
    args = [*TINY, f"output.dir={tmp_path}", "output.name=last"]
    assert run_main(capsys, *args).returncode == 0
    with h5py.File(tmp_path / "last.h5", "r+") as f:  # as if killed before closing the file
        f.attrs["status"] = "running"
        rows = len(f["metrics/round"])
    r = run_main(capsys, *args)
    assert r.returncode == 0 and "already completed" in r.stdout
    with h5py.File(tmp_path / "last.h5") as f:
        assert f.attrs["status"] == "completed" and len(f["metrics/round"]) == rows


def test_a_checkpoint_of_an_older_config_spelling_still_resumes(tmp_path):
    """data.augment was a bool before it took auto/true/false: `augment: false` in a stored
    config is the same experiment as today's 'false'."""
    from hpcfl.main import main
    from hpcfl.store import _digest

    from .conftest import TINY

    args = [*TINY, "train.rounds=3", "output.checkpoint_every=1", f"output.dir={tmp_path}",
            "output.name=old", "data.augment=false"]
    assert main([*args, "train.rounds=2"]) == 0
    for name in ("old.ckpt.h5", "old.ckpt.prev.h5"):
        with h5py.File(tmp_path / name, "r+") as f:
            f.attrs["config"] = f.attrs["config"].replace("augment: 'false'", "augment: false")
            assert "augment: false" in f.attrs["config"]
            f.attrs["sha256"] = _digest(f)
    assert main(args) == 0
    with h5py.File(tmp_path / "old.h5") as f:
        assert f.attrs["status"] == "completed" and list(f["metrics/round"][:]) == [1, 2, 3]


def test_a_checkpoint_streamed_in_small_chunks_is_the_one_written_at_once(tmp_path, monkeypatch):
    """Private rows are written (and read back) store.CHUNK_BYTES at a time, the checksum
    computed while writing: a chunk of a few rows gives the same file contents and digest."""
    from hpcfl import store
    from hpcfl.config import load_config
    from hpcfl.loop import run
    from hpcfl.world import World
    over = [*TINY, "data.num_clients=30", "train.rounds=1", f"output.dir={tmp_path}"]
    run(load_config(None, [*over, "output.name=whole"]), World("cpu"))
    monkeypatch.setattr(store, "CHUNK_BYTES", 3000)  # head rows are 2,600 bytes: 1 row a chunk
    run(load_config(None, [*over, "output.name=chunked"]), World("cpu"))
    rows = store.rows_per_chunk((10, 64))
    assert rows == 1
    with h5py.File(tmp_path / "whole.ckpt.h5") as a, h5py.File(tmp_path / "chunked.ckpt.h5") as b:
        assert a.attrs["sha256"] != b.attrs["sha256"]  # their configs differ (output.name)
        for k in a["private"]:
            assert np.array_equal(a["private"][k][:], b["private"][k][:])
        for k in a["shared"]:
            assert np.array_equal(a["shared"][k][...], b["shared"][k][...])
    # the digest written while streaming is the one recomputed from the file, either way
    assert store.verify_checkpoint(tmp_path / "chunked.ckpt.h5") == 1
    monkeypatch.setattr(store, "CHUNK_BYTES", 64 << 20)
    assert store.verify_checkpoint(tmp_path / "chunked.ckpt.h5") == 1
    with h5py.File(tmp_path / "chunked.h5") as f:
        assert f.attrs["checkpoint_bytes"] > 0 and f.attrs["checkpoint_s"] >= 0
