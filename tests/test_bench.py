import subprocess
import sys

import h5py
import numpy as np


def bench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hpcfl.bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bench_writes_a_table_and_the_documented_file(tmp_path):
    r = bench("digits-hyperfl", "--rounds", "2", "--out", "b.h5", "algorithm.name=fedavg",
              "data.num_clients=6", "train.local_epochs=1", "engine.block_size=4",
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
