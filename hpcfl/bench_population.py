"""`python -m hpcfl.bench population [--ranks R,R] [--out DIR] [key=value ...]`

What a run costs as its population grows, one row per (population, ranks): each size is a real
`python -m hpcfl.main` run in a fresh process (under `mpiexec -n R` for R > 1), so start-up and
peak memory are those a user gets. Sizes: `data.num_clients=1000,100000,1000000` (a comma
list; any other key=value is passed to every run). The base is POPULATION: HyperFL on
synthetic-mnist, data.partition=sampled with 20 training images per client, one local epoch,
3 rounds, and a cohort of COHORT clients at every size (train.frac = COHORT / clients unless
given), evaluated by train.eval_clients (auto: all clients up to 1,000, else a fixed sample of
1,000).

Columns: `startup_s` (process start to the first round, from the results file), `train_s`
(a training round, compute + allreduce + exchange of its slowest rank, median over rounds),
`eval_s` (one evaluation, median), `forward_s` (one batched forward pass of the initial model
over the same evaluated clients' test images, in this process: the floor an evaluation could
reach), `checkpoint_s` and `checkpoint_mb` (the last checkpoint), `peak_rss_gb` (the largest
resident set of any process of the run, from wait4), `rss_per_client_kb`, `private_per_client_kb`
(every client's private state in the checkpoint, per client). Writes DIR/population.csv and
DIR/population.md and keeps every run's results file in DIR, where
`python -m analysis.summarize DIR --plot F` draws cost against population and against ranks.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from .config import ConfigError, load_config

COHORT = 100
POPULATION = ["algorithm.name=hyperfl", "data.name=synthetic-mnist", "data.partition=sampled",
              "data.local_size=20", "train.rounds=3", "train.local_epochs=1",
              "output.progress=log", "output.checkpoint_every=0"]
COLUMNS = ("clients", "ranks", "cohort", "evaluated", "startup_s", "train_s", "eval_s",
           "forward_s", "checkpoint_s", "checkpoint_mb", "peak_rss_gb", "rss_per_client_kb",
           "private_per_client_kb")


def sizes_and_overrides(overrides: list[str]) -> tuple[list[int], list[str]]:
    sizes, rest = [], []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "data.num_clients":
            try:
                sizes += [int(v) for v in value.split(",")]
            except ValueError:
                raise ConfigError(f"data.num_clients: {value!r} is not a comma list of "
                                  "integers") from None
        else:
            rest.append(o)
    return sizes or [1000], rest


def run_once(args: list[str], ranks: int, log_path: Path) -> tuple[int, int, float]:
    """One run in a fresh process (tree): exit code, peak RSS in bytes, wall seconds."""
    cmd = [sys.executable, "-m", "hpcfl.main", *args]
    if ranks > 1:
        cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), *cmd]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest process of the tree
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0


def read_costs(path: Path) -> dict:
    """Start-up, train and evaluation seconds, checkpoint cost from a run's results file."""
    with h5py.File(path, "r") as f:
        t = f["timing"]
        train = sum(np.nan_to_num(t[f"{p}_s"][:]) for p in ("compute", "allreduce", "exchange"))
        evals = np.nan_to_num(t["eval_s"][:]).max(1)
        return dict(startup_s=float(f.attrs["startup_s"]),
                    train_s=float(np.median(train.max(1))),
                    eval_s=float(np.median(evals[evals > 0])) if (evals > 0).any() else 0.0,
                    checkpoint_s=float(f.attrs.get("checkpoint_s", np.nan)),
                    checkpoint_mb=float(f.attrs.get("checkpoint_bytes", 0)) / 2**20,
                    evaluated=len(f["clients/ids"]), private_bytes=private_bytes(path))


def private_bytes(results: Path) -> int:
    """Bytes of every client's private state in the run's checkpoint."""
    with h5py.File(str(results).replace(".h5", ".ckpt.h5"), "r") as f:
        return sum(ds.size * ds.dtype.itemsize for ds in f["private"].values())


def forward_seconds(overrides: list[str]) -> float:
    """One batched forward pass of the initial model over the evaluated clients' test images
    (HyperFL: client 0's generated extractor for every image), EVAL_IMAGES at a time."""
    import torch

    from .data import load_federated
    from .data.transforms import model_inputs
    from .loop import build, to_device
    from .population import EVAL_IMAGES, evaluated_clients

    cfg = load_config(None, overrides)
    data = load_federated(cfg.data, cfg.train.seed)
    algo = build(cfg, data, torch.device("cpu"))
    params = {**to_device(algo.init_shared(), "cpu"), **algo.init_client(0)}
    ids = np.concatenate([data.index.test(int(c))
                          for c in evaluated_clients(cfg.train, cfg.data.num_clients)])
    torch.set_num_threads(max(1, cfg.engine.threads))
    like = data.client(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), EVAL_IMAGES):
            x = data.test_pool.x[torch.from_numpy(ids[i:i + EVAL_IMAGES])]
            algo.forward(params, model_inputs(like, x)).argmax(-1)
    return time.perf_counter() - t0


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float)
                                            else str(r[c]) for c in COLUMNS) + " |\n"
                          for r in rows)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcfl.bench population",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ranks", default="1", help="comma list of MPI rank counts (default 1)")
    p.add_argument("--out", default="bench-population", help="folder (default %(default)s)")
    p.add_argument("overrides", nargs="*", help="section.key=value; data.num_clients=a,b,c")
    a = p.parse_intermixed_args(argv)
    try:
        sizes, rest = sizes_and_overrides(a.overrides)
        ranks = [int(r) for r in a.ranks.split(",")]
        user_frac = any(o.startswith("train.frac=") for o in rest)
        for n in sizes:  # every config checked before anything runs
            load_config(None, [*POPULATION, f"data.num_clients={n}", *rest])
    except (ConfigError, ValueError) as e:
        print(f"hpcfl.bench: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        frac = [] if user_frac else [f"train.frac={min(1.0, COHORT / n)!r}"]
        over = [*POPULATION, f"data.num_clients={n}", *frac, *rest]
        for r in ranks:
            name = f"population-{n}-r{r}"
            (out / f"{name}.h5").unlink(missing_ok=True)
            for stale in out.glob(f"{name}.ckpt*.h5"):
                stale.unlink()
            print(f"hpcfl.bench: {n:,} clients on {r} rank(s) ...", flush=True)
            rc, rss, wall = run_once([*over, f"output.dir={out}", f"output.name={name}"], r,
                                     out / f"{name}.log")
            if rc != 0:
                print(f"hpcfl.bench: error: the run of {n:,} clients on {r} rank(s) exited "
                      f"{rc}; see {out / (name + '.log')}", file=sys.stderr)
                return 1
            cfg = load_config(None, over)
            row = dict(clients=n, ranks=r, cohort=round(cfg.train.frac * n),
                       **read_costs(out / f"{name}.h5"), forward_s=forward_seconds(over),
                       peak_rss_gb=rss / 2**30, rss_per_client_kb=rss / n / 1024)
            row["private_per_client_kb"] = row.pop("private_bytes") / n / 1024
            rows.append(row)
            print(f"  start-up {row['startup_s']:.1f} s, train {row['train_s']:.2f} s/round, "
                  f"evaluation {row['eval_s']:.2f} s (forward {row['forward_s']:.2f} s), "
                  f"checkpoint {row['checkpoint_s']:.2f} s {row['checkpoint_mb']:.0f} MB, "
                  f"peak RSS {row['peak_rss_gb']:.2f} GB ({wall:.0f} s)", flush=True)
    table = markdown(rows)
    print(table, end="")
    with open(out / "population.csv", "w") as f:
        f.write(",".join(COLUMNS) + "\n")
        f.writelines(",".join(str(r[c]) for c in COLUMNS) + "\n" for r in rows)
    (out / "population.md").write_text(f"`python -m hpcfl.bench population "
                                       f"{' '.join(argv)}`\n\n{table}")
    print(f"-> {out / 'population.csv'}, {out / 'population.md'}")
    return 0
