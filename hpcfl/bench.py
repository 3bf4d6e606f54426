"""`python -m hpcfl.bench WORKLOAD [--modes M,M] [--rounds N] [--dtype D] [--out F.h5] [key=value]`
(`python -m hpcfl.bench population ...`: cost against the population, hpcfl.bench_population)

Times the rounds of a run, per engine mode, with the run's own code (data on the device, the
engine, the Allreduce, the server step, the evaluation), and writes a table and an HDF5 file:

    /                       attrs: workload, config (YAML), device, torch_version, world_size, ...
    /bench/<mode>/round_s   seconds per timed round (after one warm-up round), on rank 0
    /bench/<mode>/compute_s, allreduce_s, eval_s   the same rounds split by phase (rank 0)
    /bench/<mode>           attrs: client_updates_per_s, peak_mem_bytes, max_abs_diff, cohort

Every mode starts from the same state: the run after COMPARE_ROUND - 1 sequential rounds.
`max_abs_diff`: largest difference between this mode's and the sequential mode's averaged upload
(the server step's input) of its first round, round COMPARE_ROUND, which also warms it up. Not
round 1: HyperFL's first round from the official init (loss up to ~1e4, clipped gradients)
amplifies any last-bit difference, so a difference there measures that chaos, not the engine.
Runs under mpiexec/srun like a run; key=value overrides set cohort size and the rest.
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys
import time

import h5py
import numpy as np
import torch

from .config import DTYPES, ConfigError, load_config
from .data import load_federated
from .engine import Slot
from .loop import build, provenance, sample_cohort, to_device, train_round
from .population import Population, evaluated_clients
from .world import World

WORKLOADS = {
    # The default run's round: HyperFL on digits, 20 clients.
    "digits-hyperfl": [],
    # pfl-research's CIFAR-10 benchmark shape: 1,000 clients x 50 images, cohort 50, batch 10,
    # 5 local steps, lr 0.1, plain SGD, the 1.63M-parameter CNN; synthetic CIFAR-shaped data.
    "pfl-cifar10-fedavg": [
        "data.name=synthetic-cifar10", "data.synthetic_samples=62500", "data.num_clients=1000",
        "data.partition=iid", "data.test_fraction=0.2", "model.name=pfl_cnn",
        "algorithm.name=fedavg", "train.frac=0.05", "train.batch_size=10", "train.local_steps=5",
        "train.lr=0.1", "train.momentum=0", "train.weight_decay=0"],
    # The official HyperFL CIFAR-10 settings: 20 clients x 600 train / 300 test images, one head
    # epoch then 5 hypernetwork epochs at batch 50, random crop + flip.
    "hyperfl-cifar10": [
        "data.name=synthetic-cifar10", "data.synthetic_samples=18000", "data.num_clients=20",
        "data.test_fraction=0.3333333", "data.augment=true", "model.name=cifar_cnn",
        "algorithm.name=hyperfl",
        "train.lr=0.02"],
    # The official HyperFL-LPM ViT settings: 20 clients x 600 / 300 CIFAR-shaped images resized
    # to 384, ViT-S/16 frozen (random weights: the time does not depend on them), batch 16, one
    # head epoch then 5 epochs of hypernetwork and embedding at lr 0.1. A GPU workload.
    "hyperfl-lpm-vit": [
        "data.name=synthetic-cifar10", "data.synthetic_samples=18000", "data.num_clients=20",
        "data.test_fraction=0.3333333", "data.augment=false", "model.name=vit_adapter",
        "model.pretrained=none", "algorithm.name=hyperfl_lpm", "algorithm.head_lr=0.1",
        "train.batch_size=16", "train.lr=0.1"],
}
COMPARE_ROUND = 3  # see the module docstring


def starting_state(cfg, world: World, data) -> tuple[dict, Population]:
    """The run's shared and private state after rounds 1 .. COMPARE_ROUND - 1, sequential."""
    algo = build(cfg, data, world.device)
    shared = to_device(algo.init_shared(), world.device)
    population = Population(world, to_device(algo.init_client(0), world.device),
                            cfg.data.num_clients,
                            evaluated_clients(cfg.train, cfg.data.num_clients))
    for rnd in range(1, COMPARE_ROUND):
        train_round(cfg, world, algo, (shared, population), data, "sequential", rnd)
    return shared, population


def bench_mode(cfg, world: World, data, state: tuple[dict, Population], mode: str,
               rounds: int) -> dict:
    algo = build(cfg, data, world.device)
    shared = {k: v.clone() for k, v in state[0].items()}
    population = copy.copy(state[1])
    population.table = state[1].table.copy()
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    times, first_update, cohort_size = [], None, 0
    for rnd in range(COMPARE_ROUND, COMPARE_ROUND + rounds + 1):  # the first: warm-up, compared
        t0 = time.perf_counter()
        buf, phases = train_round(cfg, world, algo, (shared, population), data, mode,
                                  rnd)  # in cfg.engine.dtype
        compute_s, allreduce_s = phases.compute, phases.allreduce
        world.synchronize()
        t2 = time.perf_counter()
        population.evaluate(algo, shared, data)
        t3 = time.perf_counter()
        if rnd == COMPARE_ROUND:  # the averaged upload, the server step's input
            first_update = (buf.upload / buf[Slot.WEIGHT]).float().cpu()
        else:
            times.append((t2 - t0, compute_s, allreduce_s, t3 - t2))
            cohort_size = len(sample_cohort(cfg.train.seed, rnd, cfg.data.num_clients,
                                            cfg.train.frac))
    peak = (torch.cuda.max_memory_allocated(world.device) if world.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    round_s, compute_s, allreduce_s, eval_s = (np.array(c) for c in zip(*times))
    return dict(round_s=round_s, compute_s=compute_s, allreduce_s=allreduce_s, eval_s=eval_s,
                update=first_update, peak_mem_bytes=int(peak), cohort=cohort_size,
                client_updates_per_s=cohort_size / round_s.mean())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["population"]:  # cost against the population: hpcfl.bench_population
        from .bench_population import main as population
        return population(argv[1:])
    p = argparse.ArgumentParser(prog="python -m hpcfl.bench",
                                description="Time the rounds of a run per engine mode; print a "
                                "table and write an HDF5 file (see the module docstring).")
    p.add_argument("workload", nargs="?", default="digits-hyperfl",
                   help=f"one of {', '.join(WORKLOADS)} (default digits-hyperfl)")
    p.add_argument("--modes", default="sequential,vectorized")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (after warm-up)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--out", default="", help="HDF5 file (default: bench-<workload>.h5)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for hpcfl.main")
    a = p.parse_intermixed_args(argv)
    if "=" in a.workload:  # no workload given: the first argument is an override
        a.overrides.insert(0, a.workload)
        a.workload = "digits-hyperfl"
    modes = a.modes.split(",")
    try:
        if a.workload not in WORKLOADS:
            raise ConfigError(f"workload {a.workload!r} is not one of {', '.join(WORKLOADS)}")
        bad = [m for m in modes if m not in ("sequential", "vectorized")]
        if bad:
            raise ConfigError(f"--modes: {','.join(bad)} is not one of sequential, vectorized")
        if a.rounds < 1:
            raise ConfigError("--rounds: must be >= 1")
        cfg = load_config(None, [*WORKLOADS[a.workload], *a.overrides,
                                 f"engine.dtype={a.dtype}"])
        world = World(cfg.train.device, cfg.engine.threads)
        data = load_federated(cfg.data, cfg.train.seed, world.device)
    except ConfigError as e:
        print(f"hpcfl.bench: error: {e}", file=sys.stderr)
        return 2
    results, state = {}, starting_state(cfg, world, data)
    for mode in (["sequential"] if "sequential" not in modes else []) + modes:
        results[mode] = bench_mode(cfg, world, data, state, mode, a.rounds)
    ref = results["sequential"]["update"]
    for r in results.values():
        r["max_abs_diff"] = float((r["update"] - ref).abs().max()) if ref.numel() else 0.0
    attrs = provenance(cfg, world)
    if not world.is_main:
        return 0
    print(f"{a.workload}: {cfg.data.num_clients} clients, cohort {results[modes[0]]['cohort']}, "
          f"{world.size} rank(s), {world.device}, {a.dtype}, torch {torch.__version__}")
    print(f"{'mode':<11} {'s/round':>8} {'compute':>8} {'allreduce':>9} {'eval':>7} "
          f"{'updates/s':>10} {'peak MiB':>9} {'max_abs_diff':>12}")
    for mode in modes:
        r = results[mode]
        print(f"{mode:<11} {r['round_s'].mean():8.3f} {r['compute_s'].mean():8.3f} "
              f"{r['allreduce_s'].mean():9.4f} {r['eval_s'].mean():7.3f} "
              f"{r['client_updates_per_s']:10.1f} {r['peak_mem_bytes'] / 2**20:9.0f} "
              f"{r['max_abs_diff']:12.2e}")
    out = a.out or f"bench-{a.workload}.h5"
    with h5py.File(out, "w") as f:
        f.attrs.update(workload=a.workload, dtype=a.dtype, rounds=a.rounds, **attrs)
        for mode in modes:
            r = results[mode]
            g = f.create_group(f"bench/{mode}")
            for k in ("round_s", "compute_s", "allreduce_s", "eval_s"):
                g[k] = r[k]
            g.attrs.update({k: r[k] for k in ("client_updates_per_s", "peak_mem_bytes",
                                              "max_abs_diff", "cohort")})
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
