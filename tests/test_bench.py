import subprocess
import sys

import h5py
import numpy as np


def bench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hpcfl.bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bench_writes_a_table_and_the_documented_file(tmp_path):
    r = bench("digits-hyperfl", "--rounds", "2", "--out", "b.h5", "algorithm.name=fedavg",
              "data.num_clients=6", "train.local_epochs=1", "engine.stack_size=4",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("sequential ") for line in lines)
    assert any(line.startswith("vectorized ") for line in lines)
    with h5py.File(tmp_path / "b.h5") as f:
        assert f.attrs["workload"] == "digits-hyperfl" and "config" in f.attrs
        for mode in ("sequential", "vectorized"):
            g = f["bench"][mode]
            for k in ("round_s", "compute_s", "allreduce_s", "eval_s"):
                assert g[k].shape == (2,) and np.all(g[k][:] >= 0)
            assert g.attrs["client_updates_per_s"] > 0 and g.attrs["peak_mem_bytes"] > 0
            assert g.attrs["cohort"] == 6
        assert f["bench/sequential"].attrs["max_abs_diff"] == 0.0
        assert f["bench/vectorized"].attrs["max_abs_diff"] <= 1e-5  # FedAvg: no chaotic start


def test_bench_rejects_an_unknown_mode_or_workload(tmp_path):
    r = bench("--modes", "sequential,turbo", cwd=tmp_path)
    assert r.returncode == 2 and "turbo" in r.stderr and not any(tmp_path.iterdir())
    r = bench("cifar100", cwd=tmp_path)
    assert r.returncode == 2 and "'cifar100' is not one of" in r.stderr


def test_bench_under_bf16_autocast(tmp_path):
    r = bench("--rounds", "1", "--dtype", "bf16", "--out", "b.h5", "algorithm.name=fedavg",
              "data.num_clients=6", "train.local_epochs=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "b.h5") as f:
        assert f.attrs["dtype"] == "bf16"
        # both paths autocast: they agree to bf16 precision, not float32's
        assert 0 <= f["bench/vectorized"].attrs["max_abs_diff"] <= 1e-2


def test_every_workload_is_a_valid_config():
    from hpcfl.bench import WORKLOADS
    from hpcfl.config import load_config

    for name, overrides in WORKLOADS.items():
        assert load_config(None, overrides).data.num_clients >= 4, name


def test_bench_population_gives_a_row_per_size_and_summarize_draws_it(tmp_path):
    r = bench("population", "--out", "pop", "data.num_clients=40,400", "algorithm.name=fedavg",
              "train.rounds=1", "train.eval_clients=all", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import pandas as pd
    table = pd.read_csv(tmp_path / "pop" / "population.csv")
    assert table.clients.tolist() == [40, 400] and table.ranks.tolist() == [1, 1]
    assert table.cohort.tolist() == [40, 100]  # 100 clients a round, or all of fewer
    assert table.evaluated.tolist() == [40, 400]
    for c in ("startup_s", "train_s", "eval_s", "forward_s", "checkpoint_s", "peak_rss_gb"):
        assert (table[c] > 0).all(), c
    assert (table.private_per_client_kb == 0).all()  # FedAvg keeps nothing per client
    assert "| clients | ranks |" in (tmp_path / "pop" / "population.md").read_text()
    s = subprocess.run([sys.executable, "-m", "analysis.summarize", "pop", "--plot", "figs"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    assert (tmp_path / "figs" / "population.png").stat().st_size > 10_000


def test_bench_population_rejects_a_bad_size_before_running_anything(tmp_path):
    r = bench("population", "--out", "pop", "data.num_clients=40,many", cwd=tmp_path)
    assert r.returncode == 2 and "data.num_clients" in r.stderr and not any(tmp_path.iterdir())
