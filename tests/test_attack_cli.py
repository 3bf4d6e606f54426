"""`python -m hpcfl.attack`: trains the run to the round before, attacks, writes the results."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from hpcfl.attack import DEFAULT, main
from hpcfl.config import load_config
from hpcfl.data import load_federated
from hpcfl.loop import default_name
from hpcfl.privacy.metrics import psnr

QUICKSTART = str(Path(__file__).parent.parent / "jobs" / "quickstart.yaml")


def test_the_no_argument_attack_runs_and_records_what_it_found(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcfl.attack"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("ig on fedavg (server), digits, round 1, 1 client(s), 1 target image")
    path = tmp_path / "runs" / f"{default_name(load_config(None, DEFAULT))}.h5"
    with h5py.File(path) as f:
        g = f["privacy/ig"]
        psnr, truth, rec = g["psnr"][:], g["truth"][:], g["reconstruction"][:]
        assert g["label_acc"][:].tolist() == [1.0]  # iDLG reads a single image's label
        assert g["invisible"][:].tolist() == [False] and g["images"][:].tolist() == [1]
        assert g["feature_rel_error"][0] <= 1e-4  # one step of one image: exact
        assert "attack:" in g.attrs["config"] and g.attrs["round"] == 1
        index = g["index"][:]
    assert f"{psnr[0]:.2f} dB" in line and 5 < psnr[0] < 100
    cfg = load_config(None, DEFAULT)
    own = load_federated(cfg.data, 0).clients[0].x_train[index].numpy()
    assert truth.shape == rec.shape == (1, 1, 8, 8) and truth.dtype == np.uint8
    assert np.array_equal(truth, (own * 255).round().astype(np.uint8))  # the client's own digit
    assert path.with_name(f"{path.stem}-ig-r1.png").stat().st_size > 0


def test_an_attack_on_a_later_hyperfl_round_trains_to_it_first(tmp_path, capsys):
    args = ["data.num_clients=6", "data.classes_per_client=3", "train.local_steps=2",
            "train.device=cpu", "output.progress=none", f"output.dir={tmp_path}",
            "output.name=h", "attack.round=3", "attack.clients=2", "attack.iterations=30"]
    assert main([QUICKSTART, *args]) == 0
    with h5py.File(tmp_path / "h.h5") as f:
        assert list(f["metrics/round"][:]) == [1, 2]  # trained to the round before
        g = f["privacy/ig"]
        assert g["psnr"].shape == (2,) and g.attrs["threat"] == "server"
        # the targets: the 2 steps' batches of 50 of each client (of ~225 images)
        assert g["images"][:].tolist() == [100, 100] and len(g["truth"]) == 200
        # each client's PSNR is its stored images' (matched in order), up to their uint8
        # rounding, and tells a real reconstruction from nothing
        bounds = np.cumsum([0, *g["images"][:]])
        for k, recorded in enumerate(g["psnr"][:]):
            rec, truth = (g[name][bounds[k]:bounds[k + 1]] / 255.0
                          for name in ("reconstruction", "truth"))
            again = np.mean([psnr(r, t) for r, t in zip(rec, truth)])
            assert abs(again - recorded) < 0.05 and 3 < recorded < 40, (again, recorded)
    out = capsys.readouterr().out
    assert "ig on hyperfl (server), digits, round 3, 2 client(s), 200 target image(s)" in out
    # a second attack of the same round reuses the trained run, white-box this time
    assert main([QUICKSTART, *args, "attack.threat=white-box"]) == 0
    with h5py.File(tmp_path / "h.h5") as f:
        assert f["privacy/ig"].attrs["threat"] == "white-box"
        assert list(f["metrics/round"][:]) == [1, 2]


def test_idlg_on_hyperfl_is_refused_with_one_line(tmp_path, capsys):
    assert main(["algorithm.name=hyperfl", "attack.name=idlg", f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "attack.name=idlg" in err


def test_attacking_round_1_of_an_existing_run_keeps_its_results(tmp_path):
    from hpcfl.main import main as run_main

    args = ["data.num_clients=6", "data.classes_per_client=3", "train.rounds=2",
            "train.local_epochs=1", "train.device=cpu", "output.progress=none",
            f"output.dir={tmp_path}", "output.name=r"]
    assert run_main([QUICKSTART, *args]) == 0
    assert main([QUICKSTART, *args, "attack.iterations=5"]) == 0
    with h5py.File(tmp_path / "r.h5") as f:
        assert list(f["metrics/round"][:]) == [1, 2] and "privacy/ig/psnr" in f


def test_a_dp_run_attacked_at_round_2_then_finished_matches_an_unattacked_run(tmp_path):
    """The attack trains the run itself (its DP noise calibrated to all 3 rounds) to round 1;
    the same run then goes on to its end and keeps the attack's results."""
    from hpcfl.main import main as run_main
    base = [QUICKSTART, "data.num_clients=6", "algorithm.name=dpfedavg", "train.rounds=3",
            "train.local_steps=1", "train.device=cpu", "output.progress=none",
            f"output.dir={tmp_path}"]
    assert main([*base, "output.name=a", "attack.round=2", "attack.iterations=5"]) == 0
    with h5py.File(tmp_path / "a.h5") as f:
        assert f.attrs["status"] == "preempted" and list(f["metrics/round"][:]) == [1]
    assert run_main([*base, "output.name=a"]) == 0
    assert run_main([*base, "output.name=b"]) == 0
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a.attrs["status"] == "completed" and "privacy/ig/psnr" in a
        for k in ("test_acc_mean", "train_loss", "epsilon"):
            assert np.array_equal(a[f"metrics/{k}"][:], b[f"metrics/{k}"][:]), k
    assert main([*base, "output.name=c", "attack.round=4"]) == 2


def test_a_round_1_attack_writes_the_run_only_under_its_lock(tmp_path, capsys):
    """Another process writing the run (its lock held): the attack stops with one line and
    leaves no file; once the lock is free it writes /privacy."""
    args = ["attack.round=1", "attack.iterations=2", "data.num_clients=4",
            f"output.dir={tmp_path}", "output.name=r1", "output.progress=none"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from hpcfl.lock import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
         "print('held', flush=True); time.sleep(120)", str(tmp_path / "r1.h5")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args) == 2
        assert "is being written by" in capsys.readouterr().err
        assert not (tmp_path / "r1.h5").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0
    with h5py.File(tmp_path / "r1.h5") as f:
        assert f["privacy/ig/psnr"].shape == (1,)


def test_the_recorded_multi_step_is_what_the_attack_did(tmp_path):
    """DLG matches one gradient whatever attack.multi_step says: /privacy records false, not the
    config's true (the old record said true)."""
    assert main(["attack.name=dlg", "attack.iterations=2", "train.local_steps=2",
                 "output.progress=none", f"output.dir={tmp_path}", "output.name=d"]) == 0
    with h5py.File(tmp_path / "d.h5") as f:
        assert "multi_step: true" in f["privacy/dlg"].attrs["config"]
        assert not f["privacy/dlg"].attrs["multi_step"]
