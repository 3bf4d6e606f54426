"""`python -m analysis.summarize`: its tables against the numbers in the results files of real
tiny runs, the seed groups against numpy, the CSVs, the figures, the exit code without files."""
import h5py
import numpy as np
import pandas as pd
import pytest

from analysis.summarize import main as summarize
from hpcfl.main import main as run

SEEDS, METHODS = (0, 1, 2), ("fedavg", "hyperfl")


def tiny_run(out_dir, name: str, *overrides: str) -> None:
    assert run([f"output.dir={out_dir}", f"output.name={name}", "data.num_clients=4",
                "train.rounds=3", "train.local_steps=1", "train.device=cpu",
                "output.progress=none", "algorithm.head_epochs=0", *overrides]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three seeds of two methods; one run marked preempted and one diverged afterwards, as
    the runner leaves them; an unreadable file beside them."""
    d = tmp_path_factory.mktemp("runs")
    for method in METHODS:
        for seed in SEEDS:
            tiny_run(d, f"{method}-{seed}", f"algorithm.name={method}", f"train.seed={seed}")
    marked = {d / "fedavg-1.h5": "preempted", d / "hyperfl-2.h5": "diverged"}
    for path, status in marked.items():
        with h5py.File(path, "r+", locking=False) as f:
            f.attrs["status"] = status
    (d / "broken.h5").write_bytes(b"not an HDF5 file")
    return d, marked


def read_h5(path) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        acc = f["metrics/test_acc_mean"][:]
        per_round = sum(f[f"timing/{p}_s"][:]
                        for p in ("compute", "allreduce", "exchange", "eval", "io"))
        return dict(final=acc[-1], best=acc.max(), rounds=int(f["metrics/round"][-1]),
                    s_per_round=np.median(per_round.max(axis=1)),
                    world_size=int(f.attrs["world_size"]), status=f.attrs["status"])


def test_tables_match_the_files_and_numpy(runs, tmp_path, capsys):
    d, marked = runs
    capsys.readouterr()
    csv = tmp_path / "out" / "summary.csv"
    assert summarize([str(d), "--csv", str(csv), "--plot", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out

    table = pd.read_csv(csv)
    assert "algorithm.name" in table and "train.seed" in table
    assert not any(c.startswith("output.") for c in table)  # output.name differs, not shown
    assert sorted(table.file) == sorted(str(p) for p in d.glob("*-?.h5"))  # no checkpoints
    assert "1 unreadable files left out: broken.h5" in out
    for row in table.itertuples():
        h5 = read_h5(row.file)
        assert row.final_acc == pytest.approx(h5["final"], rel=1e-12)
        assert row.best_acc == pytest.approx(h5["best"], rel=1e-12)
        assert row.rounds == h5["rounds"] and row.world_size == h5["world_size"]
        assert row.s_per_round == pytest.approx(h5["s_per_round"], rel=1e-12)
        assert row.status == h5["status"]
        # the printed table says the same status on the run's line
        assert h5["status"] in next(line for line in out.splitlines() if row.file in line)
    assert {table.set_index("file").status[str(p)] for p in marked} == set(marked.values())

    seeds = pd.read_csv(tmp_path / "out" / "summary-seeds.csv").set_index("algorithm.name")
    assert sorted(seeds.index) == sorted(METHODS) and "train.seed" not in seeds
    for method in METHODS:
        files = [d / f"{method}-{s}.h5" for s in SEEDS]
        final = np.array([read_h5(f)["final"] for f in files])
        best = np.array([read_h5(f)["best"] for f in files])
        assert final.std() > 0  # seeds give different runs, so the std is a real check
        got = seeds.loc[method]
        assert got.n == len(SEEDS) and got.seeds == ",".join(map(str, SEEDS))
        assert got.final_acc_mean == pytest.approx(final.mean(), rel=1e-12)
        assert got.final_acc_std == pytest.approx(final.std(ddof=1), rel=1e-9)
        assert got.best_acc_mean == pytest.approx(best.mean(), rel=1e-12)
        assert got.best_acc_std == pytest.approx(best.std(ddof=1), rel=1e-9)
        assert f"{final.mean():.4f} ± {final.std(ddof=1):.4f}" in out

    png = tmp_path / "figs" / "accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png) in out
    # one world size, one client count: nothing to scale over
    assert "no scaling figure" in out and not (tmp_path / "figs" / "scaling.png").exists()


def test_scaling_figure_with_two_client_counts(runs, tmp_path, capsys):
    d, _ = runs
    other = tmp_path / "more"
    tiny_run(other, "fedavg-6", "algorithm.name=fedavg", "data.num_clients=6")
    capsys.readouterr()
    assert summarize([str(d), str(other), "--plot", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "final_acc" in line)
    assert "data.num_clients" in header  # now a varying key
    png = tmp_path / "figs" / "scaling.png"
    assert png.stat().st_size > 10_000 and str(png) in out


def test_no_results_files_is_exit_code_2(tmp_path, capsys):
    assert summarize([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no readable results file" in err and len(err.strip().splitlines()) == 1
