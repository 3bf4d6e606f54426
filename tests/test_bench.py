import subprocess
import sys
import time

import h5py
import numpy as np
import torch

from .schema import assert_documented


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
            assert (g.attrs["mode"], g.attrs["dtype"], g.attrs["compile"]) == (mode, "fp32", 0)
        # against the sequential path, which rounds differently: not 0 (as the sequential cell
        # against itself would be), and within float32 rounding (FedAvg: no chaotic start)
        assert 0 < f["bench/vectorized"].attrs["max_abs_diff"] <= 1e-5
        assert "max_abs_diff_fp32" not in f["bench/vectorized"].attrs  # fp32 already


def bench_here(capsys, monkeypatch, *args, cwd) -> subprocess.CompletedProcess:
    """hpcfl.bench's main in this process, in `cwd` (for what a bench refuses before it runs)."""
    from hpcfl.bench import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["hpcfl.bench", *args], code, out, err)


def test_bench_rejects_an_unknown_mode_dtype_or_workload(tmp_path, capsys, monkeypatch):
    r = bench_here(capsys, monkeypatch, "--modes", "sequential,turbo", cwd=tmp_path)
    assert r.returncode == 2 and "turbo" in r.stderr and not any(tmp_path.iterdir())
    r = bench_here(capsys, monkeypatch, "--dtype", "fp32,fp8", cwd=tmp_path)
    assert r.returncode == 2 and "--dtype: fp8 is not one of" in r.stderr
    r = bench_here(capsys, monkeypatch, "cifar100", cwd=tmp_path)
    assert r.returncode == 2 and "'cifar100' is not one of" in r.stderr


def test_bench_under_bf16_autocast(tmp_path):
    r = bench("--rounds", "1", "--dtype", "bf16", "--out", "b.h5", "algorithm.name=fedavg",
              "data.num_clients=6", "train.local_epochs=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "b.h5") as f:
        assert f.attrs["dtype"] == "bf16" and set(f["bench"]) == {"sequential-bf16",
                                                                    "vectorized-bf16"}
        g = f["bench/vectorized-bf16"]
        # against sequential bf16: both paths autocast, they agree to bf16 precision
        assert 0 < g.attrs["max_abs_diff"] <= 1e-2
        # against sequential fp32: what bf16 itself costs, more than the paths' difference
        assert g.attrs["max_abs_diff_fp32"] > g.attrs["max_abs_diff"]


def test_every_workload_is_a_valid_config():
    from hpcfl.bench import WORKLOADS
    from hpcfl.config import load_config

    from hpcfl.bench_suite import SUITE

    for name, overrides in WORKLOADS.items():
        assert load_config(None, overrides).data.num_clients >= 4, name
    for name, (workload, full, tiny) in SUITE.items():  # the suite's, as defined and tiny
        for extra in (full, tiny):
            assert load_config(None, [*WORKLOADS[workload], *extra]).data.num_clients >= 2


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


def test_bench_population_rejects_a_bad_size_before_running_anything(tmp_path, capsys,
                                                                    monkeypatch):
    r = bench_here(capsys, monkeypatch, "population", "--out", "pop",
                   "data.num_clients=40,many", cwd=tmp_path)
    assert r.returncode == 2 and "data.num_clients" in r.stderr and not any(tmp_path.iterdir())


def test_the_suite_keeps_its_budget_and_writes_its_table_and_file(tmp_path):
    """What CI runs on the 2-core CPU: `suite --budget 60` plans its work from the budget,
    measures what fits (tiny workloads on the CPU), says what it skipped, writes suite.md and
    suite.h5 with real numbers, and prints engine.mode=auto's choice."""
    t0 = time.perf_counter()
    r = bench("suite", "--budget", "60", "--out", "tmp", cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert wall < 90, wall  # the budget, and the slack of a loaded machine
    assert "engine.mode=auto on cpu: " in r.stdout and "skipped" in r.stdout
    md = (tmp_path / "tmp" / "suite.md").read_text()
    assert "`python -m hpcfl.bench suite --budget 60 --out tmp`" in md
    assert "| workload | mode | dtype | compile |" in md and "torch " in md
    with h5py.File(tmp_path / "tmp" / "suite.h5") as f:
        assert f.attrs["command"] == "python -m hpcfl.bench suite --budget 60 --out tmp"
        assert f.attrs["wall_s"] <= 60 and f.attrs["torch_version"] and f.attrs["cpu"]
        cells = [g for w in f["cells"].values() for g in w.values()]
        assert {g.attrs["mode"] for g in cells} == {"sequential", "vectorized"}
        for g in cells:
            assert np.isfinite(g["round_s"][:]).all() and g.attrs["s_per_round"] > 0
            assert g.attrs["client_updates_per_s"] > 0 and g.attrs["peak_mem_bytes"] > 0
            assert np.isfinite(g.attrs["max_abs_diff"])
        assert any(g.attrs["mode"] == "vectorized" and 0 < g.attrs["max_abs_diff"] < 1e-3
                   for g in cells)
        skipped = [s.decode() for s in f["skipped"][:]]
        if not torch.cuda.is_available():
            assert f["gpu_tests"].attrs["status"] == "skipped"
            assert "tests marked gpu: no CUDA device here" in skipped
        assert f.attrs["auto_mode"] in ("sequential", "vectorized")
    assert_documented(tmp_path / "tmp" / "suite.h5", "suite")  # its cells and scaling too


def test_bench_allreduce_times_the_round_buffer_of_a_workload(capsys):
    """python -m hpcfl.bench allreduce (docs/testbed.md measures it across the testbed's nodes),
    in this process: one rank, the default run's HyperFL buffer (its hypernetwork in float64
    plus the round's 4 slots)."""
    import re

    from hpcfl.bench import main
    from hpcfl.config import load_config
    from hpcfl.data import load_federated
    from hpcfl.loop import build

    cfg = load_config(None, ["train.device=cpu"])
    numel = sum(v.numel() for v in build(cfg, load_federated(cfg.data, 0), torch.device("cpu"))
                .init_shared().values())
    assert main(["allreduce", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    m = re.fullmatch(r"digits-hyperfl: ([\d.]+) MB, 1 rank\(s\) on \S+: median [\d.]+ ms, "
                     r"fastest [\d.]+ ms, [\d.]+ GB/s\n", out)
    assert m and float(m[1]) == round((numel + 4) * 8 / 1e6, 2), out
    assert main(["allreduce", "cifar100"]) == 2
    assert "'cifar100' is not one of" in capsys.readouterr().err
