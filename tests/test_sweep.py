"""`python -m hpcfl.sweep`: grids and points of runs; the privacy-utility figure from their files."""
import h5py
import yaml

from analysis.privacy_utility import collect
from analysis.privacy_utility import main as figure
from hpcfl.sweep import main as sweep


def write_sweep(tmp_path, **spec):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


BASE = {"data": {"num_clients": 6, "public_fraction": 0.1},
        "train": {"rounds": 3, "local_steps": 1, "device": "cpu"},
        "attack": {"round": 2, "clients": 1, "iterations": 10},
        "output": {"progress": "none"}}


def test_list_numbers_the_product_of_grid_and_points(tmp_path, capsys):
    path = write_sweep(tmp_path, base=BASE,
                       grid={"train.seed": [0, 1], "train.lr": [0.05, 0.1]},
                       points=[{"algorithm.name": "fedavg"}, {"algorithm.name": "hyperfl"}])
    assert sweep([path, "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "8 points (a Slurm array: --array=0-7)"
    assert out[0].split() == ["0", "algorithm.name=fedavg", "train.seed=0", "train.lr=0.05"]
    assert out[7].split() == ["7", "algorithm.name=hyperfl", "train.seed=1", "train.lr=0.1"]
    assert sweep([path, "--index", "8"]) == 2
    assert "points 0-7" in capsys.readouterr().err
    bad = write_sweep(tmp_path, base=BASE, grid={"train.lr": 0.1})
    assert sweep([bad, "--list"]) == 2


def test_an_attacked_sweep_trains_attacks_skips_and_feeds_the_figure(tmp_path, capsys):
    base = dict(BASE, output={"progress": "none", "dir": str(tmp_path / "runs")})
    path = write_sweep(tmp_path, base=base, attack=True, points=[
        {"algorithm.name": "fedavg", "privacy.defense": "none"},
        {"algorithm.name": "fedavg", "privacy.defense": "dp_gaussian", "privacy.noise": 0.1},
        {"algorithm.name": "fedavg", "privacy.defense": "soteria",
         "attack.mute_defended_layer": True}])
    for i in range(3):
        assert sweep([path, "--index", str(i)]) == 0
    with h5py.File(tmp_path / "runs" / "s-001.h5") as f:
        assert f.attrs["status"] == "completed" and list(f["metrics/round"][:]) == [1, 2, 3]
        assert f["privacy/ig"].attrs["round"] == 2
        assert f["privacy/ig"].attrs["defense"] == "dp_gaussian"
    capsys.readouterr()
    assert sweep([path, "--index", "1"]) == 0  # finished: skipped
    assert "already completed" in capsys.readouterr().out
    table, skipped = collect([str(tmp_path / "runs")])
    assert sorted(table.defense) == ["dp_gaussian", "none", "soteria"] and skipped == 0
    assert table.set_index("defense").loc["soteria", "muted"]
    assert ((table.accuracy > 0) & (table.accuracy <= 1) & (table.psnr > 0)).all()
    png = tmp_path / "fig.png"
    assert figure([str(tmp_path / "runs"), "--out", str(png), "--csv",
                   str(tmp_path / "t.csv")]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "t.csv").read_text().count("\n") == 4
    assert figure([str(tmp_path)]) == 2  # no results files there
