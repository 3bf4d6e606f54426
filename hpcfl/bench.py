"""`python -m hpcfl.bench WORKLOAD [--modes M,M] [--dtype D,D] [--compile off,on]
[--cells mode:dtype:off|on,...] [--rounds N] [--out F.h5] [key=value]`
(`python -m hpcfl.bench population ...`: cost against the population, hpcfl.bench_population;
`python -m hpcfl.bench suite ...`: everything on one machine within a time budget,
hpcfl.bench_suite; `python -m hpcfl.bench allreduce ...`: the round's Allreduce alone,
hpcfl.bench_allreduce)

Times the rounds of a run, per cell (engine.mode x engine.dtype x engine.compile), with the
run's own code (data on the device, the engine, the Allreduce, the server step, the evaluation),
and writes a table and an HDF5 file:

    /                     attrs: workload, dtype, compile, rounds, config (YAML), device,
                          torch_version, world_size, ...
    /bench/<cell>/round_s seconds per timed round (after one warm-up round), on rank 0
    /bench/<cell>/compute_s, allreduce_s, eval_s   the same rounds split by phase (rank 0)
    /bench/<cell>         attrs: mode, dtype, compile, client_updates_per_s, peak_mem_bytes,
                          max_abs_diff, max_abs_diff_fp32 (cells of another dtype), cohort,
                          error (a cell that failed: its one line; no numbers then)

<cell> is the mode, then the dtype unless fp32, then "compiled" with engine.compile: e.g.
`sequential`, `vectorized-bf16`, `vectorized-compiled`. Every cell starts from the same state:
the run after COMPARE_ROUND - 1 sequential fp32 rounds. `max_abs_diff`: largest difference
between this cell's and the eager sequential cell's averaged upload (the server step's input)
in the same dtype, of its first round, round COMPARE_ROUND, which also warms it up (and
compiles); `max_abs_diff_fp32` the same against eager sequential fp32. Not round 1: HyperFL's
first round from the official init (loss up to ~1e4, clipped gradients) amplifies any last-bit
difference, so a difference there measures that chaos, not the engine. `peak_mem_bytes`: the
CUDA peak allocated during the cell; on the CPU the process's peak RSS so far (it only grows).
Runs under mpiexec/srun like a run; key=value overrides set cohort size and the rest. Exit code
1 when a cell failed (its error is in the file), 2 for a mistake in the arguments.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
from dataclasses import dataclass, replace

import h5py
import numpy as np
import torch

from .bench_population import POPULATION
from .config import DTYPES, ConfigError, load_config
from .data import load_federated
from .engine import Slot
from .loop import build, check_compile, provenance, sample_cohort, to_device, train_round
from .oneline import one_line
from .population import Population, evaluated_clients
from .world import World

# The population bench's base as a round to time: without its run length and output keys.
POPULATION_RUN = [o for o in POPULATION if o.split("=")[0] not in (
    "train.rounds", "output.progress", "output.checkpoint_every")]
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
    # python -m hpcfl.bench population's base (HyperFL on synthetic-mnist, each client drawn
    # alone, 20 images) at 100,000 clients, cohort 100, 1,000 of them evaluated.
    "population-100k": [*POPULATION_RUN, "data.num_clients=100000", "train.frac=0.001"],
}
COMPARE_ROUND = 3  # see the module docstring
MODES = ("sequential", "vectorized")
TIMINGS = ("round_s", "compute_s", "allreduce_s", "eval_s")


@dataclass(frozen=True)
class Cell:
    """One measured configuration of the engine."""
    mode: str
    dtype: str = "fp32"
    compile: bool = False

    @property
    def name(self) -> str:
        """Its group under /bench: mode[-dtype unless fp32][-compiled]."""
        return "-".join([self.mode, *([self.dtype] if self.dtype != "fp32" else []),
                         *(["compiled"] if self.compile else [])])

    @property
    def reference(self) -> "Cell":
        """The cell its max_abs_diff compares with: eager sequential in its dtype."""
        return Cell("sequential", self.dtype)


def cells_of(modes: list[str], dtypes: list[str], compiles: list[bool]) -> list[Cell]:
    """Every combination, dtype by dtype, in the order given."""
    return [Cell(m, d, c) for d in dtypes for c in compiles for m in modes]


@dataclass
class Start:
    """The state every cell starts from, and the algorithm that trains it (one per process:
    compiled steps are kept per algorithm, hpcfl.engine.compiled)."""
    algo: object
    shared: dict
    population: Population


def with_cell(cfg, cell: Cell):
    return replace(cfg, engine=replace(cfg.engine, dtype=cell.dtype, compile=cell.compile))


def starting_state(cfg, world: World, data) -> Start:
    """The run's shared and private state after rounds 1 .. COMPARE_ROUND - 1, sequential fp32,
    eager."""
    cfg = with_cell(cfg, Cell("sequential"))
    algo = build(cfg, data, world.device)
    shared = to_device(algo.init_shared(), world.device)
    population = Population(world, to_device(algo.init_client(0), world.device),
                            cfg.data.num_clients,
                            evaluated_clients(cfg.train, cfg.data.num_clients))
    for rnd in range(1, COMPARE_ROUND):
        train_round(cfg, world, algo, (shared, population), data, "sequential", rnd)
    return Start(algo, shared, population)


def measure(cfg, world: World, data, start: Start, cell: Cell, rounds: int) -> dict:
    """Round COMPARE_ROUND (warm-up, compared), then `rounds` timed rounds, of `cell` from
    `start` (left as it was). rounds=0: the compared round alone (a reference)."""
    cfg = with_cell(cfg, cell)
    shared = {k: v.clone() for k, v in start.shared.items()}
    population = copy.copy(start.population)
    population.table = start.population.table.copy()
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    times, first_update, cohort_size = [], None, 0
    for rnd in range(COMPARE_ROUND, COMPARE_ROUND + rounds + 1):  # the first: warm-up, compared
        t0 = time.perf_counter()
        buf, phases = train_round(cfg, world, start.algo, (shared, population), data, cell.mode,
                                  rnd)
        world.synchronize()
        t2 = time.perf_counter()
        population.evaluate(start.algo, shared, data)
        t3 = time.perf_counter()
        if rnd == COMPARE_ROUND:  # the averaged upload, the server step's input
            first_update = (buf.upload / buf[Slot.WEIGHT]).float().cpu()
        else:
            times.append((t2 - t0, phases.compute, phases.allreduce, t3 - t2))
        cohort_size = len(sample_cohort(cfg.train.seed, rnd, cfg.data.num_clients,
                                        cfg.train.frac))
    peak = (torch.cuda.max_memory_allocated(world.device) if world.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {k: np.array(c, dtype=float) for k, c in zip(TIMINGS, zip(*times))} if times else {
        k: np.zeros(0) for k in TIMINGS}
    return dict(out, update=first_update, peak_mem_bytes=int(peak), cohort=cohort_size,
                client_updates_per_s=(cohort_size / out["round_s"].mean() if times
                                      else float("nan")))


def measure_all(cfg, world: World, data, cells: list[Cell], rounds: int, report) -> dict:
    """Every cell (each dtype's eager sequential reference first, timed only if asked for),
    with its differences to the references; a cell that fails on a single process is recorded
    with its error and the rest go on. report(cell, result) after each asked-for cell."""
    start, results = starting_state(cfg, world, data), {}
    compile_error = None
    fp32 = Cell("sequential")
    refs = list(dict.fromkeys([c.reference for c in cells] + [
        fp32 for c in cells if c.dtype != "fp32" or c.compile]))
    refs.sort(key=lambda c: c != fp32)  # fp32 first, as every other reference is compared to it
    for cell in dict.fromkeys(refs + cells):
        try:
            if cell.compile and compile_error is None:
                check_compile(with_cell(cfg, cell), world.device)
                compile_error = ""
            if cell.compile and compile_error:
                raise ConfigError(compile_error)
            r = measure(cfg, world, data, start, cell, rounds if cell in cells else 0)
        except Exception as e:  # recorded, and the other cells measured: one process only
            if world.size > 1:
                raise
            if isinstance(e, ConfigError) and cell.compile:
                compile_error = str(e)
            r = dict(error=f"{type(e).__name__}: {one_line(e)}")
            if world.device.type == "cuda":
                torch.cuda.empty_cache()
        for key, ref in (("max_abs_diff", cell.reference), ("max_abs_diff_fp32", fp32)):
            if key == "max_abs_diff_fp32" and cell.dtype == "fp32":
                continue
            got, want = r.get("update"), (r if ref == cell else results.get(ref, {})).get(
                "update")
            if got is not None and want is not None:
                r[key] = float((got - want).abs().max()) if want.numel() else 0.0
        results[cell] = r
        if cell in cells:
            report(cell, r)
    return {c: results[c] for c in cells}


def write(path: str, attrs: dict, results: dict) -> None:
    """The whole file, written beside and renamed: a bench killed at any moment leaves the
    file of the cells it finished (hpcfl.bench_suite reads it)."""
    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        for cell, r in results.items():
            g = f.create_group(f"bench/{cell.name}")
            g.attrs.update(mode=cell.mode, dtype=cell.dtype, compile=cell.compile)
            if "error" in r:
                g.attrs["error"] = r["error"]
                continue
            for k in TIMINGS:
                g[k] = r[k]
            g.attrs.update({k: r[k] for k in ("client_updates_per_s", "peak_mem_bytes",
                                              "max_abs_diff", "max_abs_diff_fp32", "cohort")
                            if k in r})
    os.replace(tmp, path)


def row(cell: Cell, r: dict) -> str:
    head = f"{cell.mode:<11} {cell.dtype:<5} {'on' if cell.compile else 'off':<7} "
    if "error" in r:
        return head + f"failed: {r['error']}"
    return head + (f"{r['round_s'].mean():8.3f} {r['compute_s'].mean():8.3f} "
                   f"{r['allreduce_s'].mean():9.4f} {r['eval_s'].mean():7.3f} "
                   f"{r['client_updates_per_s']:10.1f} {r['peak_mem_bytes'] / 2**20:9.0f} "
                   f"{r.get('max_abs_diff', float('nan')):12.2e}")


def parse_list(text: str, allowed: tuple, what: str) -> list[str]:
    items = text.split(",")
    bad = [m for m in items if m not in allowed]
    if bad:
        raise ConfigError(f"{what}: {','.join(bad)} is not one of {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_cell(text: str) -> Cell:
    parts = text.split(":")
    if len(parts) != 3:
        raise ConfigError(f"--cells: {text!r} is not mode:dtype:off|on")
    mode, dtype, compiled = (parse_list(v, allowed, "--cells")[0] for v, allowed in zip(
        parts, (MODES, DTYPES, ("off", "on"))))
    return Cell(mode, dtype, compiled == "on")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["population"]:  # cost against the population: hpcfl.bench_population
        from .bench_population import main as population
        return population(argv[1:])
    if argv[:1] == ["suite"]:  # everything within a budget: hpcfl.bench_suite
        from .bench_suite import main as suite
        return suite(argv[1:])
    if argv[:1] == ["allreduce"]:  # the round's Allreduce alone: hpcfl.bench_allreduce
        from .bench_allreduce import main as allreduce
        return allreduce(argv[1:], WORKLOADS)
    p = argparse.ArgumentParser(prog="python -m hpcfl.bench",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n", 1)[1],
                                epilog="The two other benches, each with its own --help:\n"
                                "  python -m hpcfl.bench population [--ranks R,R] [--out DIR] "
                                "[key=value ...]\n    what a run costs as its population "
                                "grows (hpcfl.bench_population)\n"
                                "  python -m hpcfl.bench suite [--budget S] [--out DIR] "
                                "[--scale auto|tiny|full]\n    everything on one machine "
                                "within a time budget (hpcfl.bench_suite)")
    p.add_argument("workload", nargs="?", default="digits-hyperfl",
                   help=f"one of {', '.join(WORKLOADS)} (default digits-hyperfl)")
    p.add_argument("--modes", default="sequential,vectorized",
                   help=f"comma list of {', '.join(MODES)} (default: both)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per cell (after warm-up)")
    p.add_argument("--dtype", default="fp32", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--compile", default="off", help="engine.compile: off, on, or off,on")
    p.add_argument("--cells", default="", help="instead of every combination of the three "
                   "above: a comma list of mode:dtype:off|on (hpcfl.bench_suite's)")
    p.add_argument("--out", default="", help="HDF5 file (default: bench-<workload>.h5)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for hpcfl.main")
    a = p.parse_intermixed_args(argv)
    if "=" in a.workload:  # no workload given: the first argument is an override
        a.overrides.insert(0, a.workload)
        a.workload = "digits-hyperfl"
    try:
        if a.workload not in WORKLOADS:
            raise ConfigError(f"workload {a.workload!r} is not one of {', '.join(WORKLOADS)}")
        modes = parse_list(a.modes, MODES, "--modes")
        dtypes = parse_list(a.dtype, DTYPES, "--dtype")
        compiles = [c == "on" for c in parse_list(a.compile, ("off", "on"), "--compile")]
        cells = cells_of(modes, dtypes, compiles)
        if a.cells:
            cells = [parse_cell(c) for c in a.cells.split(",")]
        if a.rounds < 1:
            raise ConfigError("--rounds: must be >= 1")
        cfg = load_config(None, [*WORKLOADS[a.workload], *a.overrides])
        world = World(cfg.train.device, cfg.engine.threads)
        data = load_federated(cfg.data, cfg.train.seed, world.device)
    except ConfigError as e:
        print(f"hpcfl.bench: error: {e}", file=sys.stderr)
        return 2
    attrs = dict(workload=a.workload, dtype=a.dtype, compile=a.compile, rounds=a.rounds,
                 **provenance(cfg, world))
    out = a.out or f"bench-{a.workload}.h5"
    done: dict = {}

    def report(cell: Cell, r: dict) -> None:
        done[cell] = r
        if world.is_main:
            print(row(cell, r), flush=True)
            write(out, attrs, done)

    if world.is_main:
        print(f"{a.workload}: {cfg.data.num_clients} clients, {world.size} rank(s), "
              f"{world.device}, torch {torch.__version__}")
        print(f"{'mode':<11} {'dtype':<5} {'compile':<7} {'s/round':>8} {'compute':>8} "
              f"{'allreduce':>9} {'eval':>7} {'updates/s':>10} {'peak MiB':>9} "
              f"{'max_abs_diff':>12}", flush=True)
    results = measure_all(cfg, world, data, cells, a.rounds, report)
    if not world.is_main:
        return 0
    print(f"-> {out}")
    failed = [c.name for c, r in results.items() if "error" in r]
    if failed:
        print(f"hpcfl.bench: {len(failed)} cell(s) failed: {', '.join(failed)} (the error of "
              f"each is in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
