"""`python -m hpcfl.sweep`: grids and points of runs; the privacy-utility figure from them."""
from pathlib import Path

import h5py
import pytest
import yaml

from analysis.privacy_utility import collect
from analysis.privacy_utility import main as figure
from hpcfl.config import load_config
from hpcfl.sweep import load_sweep, point_config
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
    assert out[0].split() == ["0", "algorithm.name=fedavg", "train.seed=0", "train.lr=0.05",
                              "->", "runs/s-000.h5"]
    assert out[7].split()[:4] == ["7", "algorithm.name=hyperfl", "train.seed=1", "train.lr=0.1"]
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
    # folders are searched below them too; one without results files is an error
    assert figure([str(tmp_path), "--out", str(tmp_path / "all.png")]) == 0
    (tmp_path / "empty").mkdir()
    assert figure([str(tmp_path / "empty")]) == 2


JOBS = Path(__file__).resolve().parent.parent / "jobs"


@pytest.mark.parametrize("path", sorted(JOBS.glob("**/sweep.yaml")), ids=lambda p: p.parent.name)
def test_every_sweep_in_jobs_lists_valid_points(path):
    spec, points = load_sweep(str(path))
    configs = [point_config(str(path), spec, q, i) for i, q in enumerate(points)]
    assert len({c.output.name for c in configs}) == len(points) > 1


@pytest.mark.parametrize("path", sorted(JOBS.glob("privacy/verdict_*.yaml")),
                         ids=lambda p: p.stem)
def test_every_verdict_sweep_lists_valid_points_attacking_round_2(path):
    spec, points = load_sweep(str(path))
    configs = [point_config(str(path), spec, q, i) for i, q in enumerate(points)]
    assert len({c.output.name for c in configs}) == len(points) > 1
    assert spec["attack"] and all(c.attack.round == 2 for c in configs)


def test_the_paper_sweep_is_the_paper_files_at_three_seeds():
    path = JOBS / "paper" / "sweep.yaml"
    spec, points = load_sweep(str(path))
    sweep_cfgs = {}
    for i, q in enumerate(points):
        c = point_config(str(path), spec, q, i).to_dict()
        c["output"].pop("name")
        sweep_cfgs.setdefault(yaml.safe_dump(c), []).append(c["train"]["seed"])
    files = sorted((JOBS / "paper").glob("*-*c-*.yaml"))
    assert len(files) == 48 and len(points) == 48 * 3
    for f in files:
        c = load_config(str(f)).to_dict()
        c["output"].pop("name")
        for seed in (0, 1, 2):
            c["train"]["seed"] = seed
            assert seed in sweep_cfgs.get(yaml.safe_dump(c), []), f.name


def test_overrides_apply_to_every_point_but_not_to_its_name(tmp_path, capsys):
    path = write_sweep(tmp_path, base=BASE, grid={"train.seed": [0, 1]})
    spec, points = load_sweep(path)
    cfg = point_config(path, spec, points[1], 1, ["output.dir=elsewhere", "train.rounds=7"])
    assert (cfg.output.dir, cfg.output.name, cfg.train.rounds) == ("elsewhere", "s-001", 7)
    assert sweep([path, "--index", "0", "output.name=same"]) == 2
    assert "output.name is set per point" in capsys.readouterr().err
