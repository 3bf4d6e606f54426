"""`python -m hpcfl.bench suite [--budget SECONDS] [--out DIR] [--scale auto|tiny|full]`

Everything hpcfl measures about one machine, in one command that stays within a time budget
(default 480 s: an accelerator is lent in slices of about 15 minutes). It plans the work from
the budget: every item has an estimated cost (priors per device type, corrected by what the
items before it took), items run in order of importance while they fit, and what does not fit
is printed and recorded as skipped, with why. In that order:

1. the default run's round (digits-hyperfl), sequential and vectorized, fp32, eager;
2. the tests marked `gpu` (tests/test_gpu.py: engine paths, rank counts, kill and resume, on
   CUDA), as a child pytest; skipped with the reason where there is no CUDA device;
3. weak scaling: 1, 2, 4 ranks sharing the device (`mpiexec -n N python -m hpcfl.bench`),
   pfl-cifar10-fedavg with the same cohort per rank, with the Allreduce's share of the round;
4. the other workloads (hpcfl.bench.WORKLOADS: pfl-cifar10-fedavg, hyperfl-cifar10 at 20 and
   100 clients, hyperfl-lpm-vit, population-100k), sequential and vectorized, cheapest first;
5. every workload measured in 4 again in the other engine.dtype (bf16; tf32 on CUDA) and with
   engine.compile on, cells dropped from the end while they do not fit.

Every measurement is a child `python -m hpcfl.bench` (hpcfl.bench's cells, table and file),
killed past twice its estimate; a child writes its file after each cell, so a killed one keeps
what it finished. `--scale auto`: the workloads as defined on CUDA, tiny versions (fewer
clients, images and steps: TINY) elsewhere. Writes DIR/suite.h5 and DIR/suite.md (machine,
versions, the exact command, the cells, the scaling, the tests, what was skipped) and prints
engine.mode=auto's choice from the measured numbers; every child's file and log stay in DIR.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from . import bench_report as report

MAIN = "digits-hyperfl"
SCALING = "pfl-cifar10-fedavg"
# The suite's workloads: (hpcfl.bench workload, overrides as defined, overrides when tiny).
# (hpcfl.bench imports this module: its WORKLOADS are named here, not imported.)
SUITE = {
    "digits-hyperfl": ("digits-hyperfl", [], ["data.num_clients=6", "train.local_epochs=1"]),
    "pfl-cifar10-fedavg": ("pfl-cifar10-fedavg", [], [
        "data.num_clients=40", "data.synthetic_samples=2500", "train.frac=0.1",
        "train.eval_clients=8"]),
    "hyperfl-cifar10-20": ("hyperfl-cifar10", [], [
        "data.synthetic_samples=900", "train.local_epochs=1"]),
    "hyperfl-cifar10-100": ("hyperfl-cifar10", [
        "data.num_clients=100", "data.synthetic_samples=90000"], [
        "data.num_clients=100", "data.synthetic_samples=4500", "train.local_epochs=1",
        "train.frac=0.1"]),
    "hyperfl-lpm-vit": ("hyperfl-lpm-vit", [], [
        "data.num_clients=2", "data.synthetic_samples=24", "data.partition=iid",
        "train.local_steps=1",
        "algorithm.head_epochs=1", "train.batch_size=4"]),
    "population-100k": ("population-100k", [], [
        "data.num_clients=10000", "train.frac=0.0004", "train.eval_clients=8"]),
}
# Seconds per sequential fp32 round (with its evaluation) by (device type, scale): priors that
# the first child corrects. cpu/tiny measured on a 2-core VM; cuda/full guessed (no GPU yet).
PRIOR_ROUND_S = {
    ("cpu", "tiny"): {"digits-hyperfl": 0.45, "pfl-cifar10-fedavg": 0.55,
                      "hyperfl-cifar10-20": 5.7, "hyperfl-cifar10-100": 2.5,
                      "hyperfl-lpm-vit": 20, "population-100k": 1.5},
    ("cuda", "full"): {"digits-hyperfl": 0.5, "pfl-cifar10-fedavg": 1.5,
                       "hyperfl-cifar10-20": 4, "hyperfl-cifar10-100": 20,
                       "hyperfl-lpm-vit": 40, "population-100k": 3},
}
STARTUP_S = {"cpu": 7.0, "cuda": 15.0}  # a child: Python, torch, CUDA, data
COMPILE_S = {"cpu": 60.0, "cuda": 60.0}  # first compile of one path's steps (2-4 graphs)
DTYPE_FACTOR = {("cpu", "bf16"): 4.0, ("cuda", "bf16"): 0.8, ("cuda", "tf32"): 0.9}
GPU_TESTS_S = 240.0  # 5 runs of hpcfl.main, two compiles with CUDA graphs
RESERVE_S = 3.0  # writing suite.h5 and suite.md


@dataclass
class Plan:
    """The budget and what has been done with it."""
    budget: float
    device: str
    scale: str
    out: Path
    t0: float = field(default_factory=lambda: time.perf_counter() - since_start())
    correction: dict = field(default_factory=dict)  # workload (or "*") -> actual / estimate
    skipped: list = field(default_factory=list)

    def left(self) -> float:
        return self.budget - RESERVE_S - (time.perf_counter() - self.t0)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        print(f"hpcfl.bench suite: skipped {what}: {why}", flush=True)

    def fits(self, what: str, estimate: float) -> bool:
        if estimate <= self.left():
            return True
        self.skip(what, f"estimated {estimate:.0f} s, {max(self.left(), 0):.0f} s left")
        return False

    def factor(self, workload: str) -> float:
        """Actual over estimated work: this workload's, else the mean (geometric) of those
        measured, else 1."""
        if workload in self.correction:
            return self.correction[workload]
        seen = list(self.correction.values())
        return float(np.exp(np.mean(np.log(seen)))) if seen else 1.0

    def learn(self, workload: str, cells: list, rounds: int, took: float) -> None:
        """Correct later estimates by what a child took against its estimated work (startup
        and compiles, which do not scale with the workload, left out)."""
        work, fixed = self.work(workload, cells, rounds)
        self.correction[workload] = max(took - STARTUP_S[self.device] - fixed, 0.5) / max(work,
                                                                                           0.5)

    def round_s(self, workload: str) -> float:
        priors = PRIOR_ROUND_S.get((self.device, self.scale), PRIOR_ROUND_S[("cuda", "full")])
        return priors[workload]

    def work(self, workload: str, cells: list, rounds: int) -> tuple[float, float]:
        """A bench child's work by the priors, in seconds: rounds (the starting rounds, each
        cell's compared and timed rounds, the references it adds), and compiles (one per
        compiled path)."""
        r = self.round_s(workload)

        def one(dtype: str) -> float:
            return r * DTYPE_FACTOR.get((self.device, dtype), 1.0)
        refs = {("sequential", d) for _, d, _ in cells} | (
            {("sequential", "fp32")} if any(d != "fp32" or c for _, d, c in cells) else set())
        refs -= {(m, d) for m, d, c in cells if not c}  # measured as cells anyway
        rounds_s = 2 * r + sum(one(d) for _, d in refs) + sum((1 + rounds) * one(d)
                                                              for _, d, _ in cells)
        return rounds_s, COMPILE_S[self.device] * sum(c for _, _, c in cells)

    def estimate(self, workload: str, cells: list, rounds: int) -> float:
        work, fixed = self.work(workload, cells, rounds)
        return STARTUP_S[self.device] + fixed + work * self.factor(workload)


def since_start() -> float:
    """Seconds since this process started (importing torch takes some of the budget too):
    its start time (field 22 of /proc/self/stat, clock ticks after boot) against the uptime."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def overrides(plan: Plan, name: str) -> list[str]:
    _, full, tiny = SUITE[name]
    return [*(tiny if plan.scale == "tiny" else full), f"train.device={plan.device}"]


def child(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run a child command in its own session (mpiexec and its ranks killed together past
    `timeout`); its exit code (-9 if killed) and wall seconds."""
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = -9
    return rc, time.perf_counter() - t0


def read_bench(path: Path) -> dict:
    """cell name -> its attrs and timings, from a bench child's file (empty if none)."""
    if not path.exists():
        return {}
    with h5py.File(path, "r") as f:
        return {name: {**dict(g.attrs), **{k: g[k][:] for k in g}}
                for name, g in f.get("bench", {}).items()}


def bench(plan: Plan, name: str, cells: list, tag: str, ranks: int = 1,
          extra: tuple = ()) -> dict | None:
    """One bench child of `cells` [(mode, dtype, compiled)] of workload `name`, if it fits;
    its cells by name (those it finished), or None."""
    rounds = 1 if plan.scale == "tiny" else 2
    est = plan.estimate(name, cells, rounds) * (1.3 if ranks > 1 else 1.0)
    what = f"{name} {tag}"
    if not plan.fits(what, est):
        return None
    out = plan.out / f"{name}-{tag}.h5"
    out.unlink(missing_ok=True)
    opts = ["--cells", ",".join(f"{m}:{d}:{'on' if c else 'off'}" for m, d, c in cells)]
    cmd = [sys.executable, "-m", "hpcfl.bench", SUITE[name][0], *opts, "--rounds", str(rounds),
           "--out", str(out), *overrides(plan, name), *extra]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    print(f"hpcfl.bench suite: {what} (estimated {est:.0f} s) ...", flush=True)
    log = out.with_suffix(".log")
    rc, took = child(cmd, log, min(plan.left(), 2 * est + 15))
    if rc == 0 and ranks == 1:  # mpiexec's start is no measure of the workload
        plan.learn(name, cells, rounds, took)
    got = read_bench(out)
    wanted = {(m, d, c) for m, d, c in cells}
    got = {k: v for k, v in got.items() if (v["mode"], v["dtype"], bool(v["compile"])) in wanted}
    last = ([s for s in log.read_text().splitlines() if s.strip()] or ["(no output)"])[-1]
    print(f"  {len(got)} of {len(cells)} cell(s) in {took:.0f} s"
          + (f"; exit {rc}: {last} (see {log})" if rc else ""), flush=True)
    for m, d, c in cells:
        if not any((v["mode"], v["dtype"], bool(v["compile"])) == (m, d, c) for v in got.values()):
            plan.skip(f"{name} {m} {d} compile={'on' if c else 'off'}",
                      "killed past twice its estimate" if rc == -9 else f"the child exited {rc}")
    return got


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else (shutil.which("mpiexec") or "mpiexec")


def variants(device: str) -> list[tuple[str, str, bool]]:
    """Step 5's cells in order of importance: compiled fp32, the other dtypes, compiled too."""
    dtypes = ["bf16", "tf32"] if device == "cuda" else ["bf16"]
    out = [(m, "fp32", True) for m in ("sequential", "vectorized")]
    out += [(m, d, False) for d in dtypes for m in ("sequential", "vectorized")]
    return out + [(m, d, True) for d in dtypes for m in ("sequential", "vectorized")]


def scaling(plan: Plan, mode: str) -> dict:
    """Weak scaling: pfl-cifar10-fedavg (clients of one size: the work grows with the cohort)
    with the same cohort per rank (train.frac times the ranks) on 1, 2, 4 ranks."""
    frac = dict(o.split("=") for o in overrides(plan, SCALING)).get("train.frac", "0.05")
    rows = {}
    cores = len(os.sched_getaffinity(0))
    for ranks in (1, 2, 4):
        if plan.device == "cpu" and ranks > cores:
            plan.skip(f"weak scaling, {ranks} ranks", f"{ranks} ranks on {cores} CPU cores "
                      "would measure ranks waiting for a core")
            continue
        got = bench(plan, SCALING, [(mode, "fp32", False)], f"scaling-{ranks}", ranks,
                    (f"train.frac={float(frac) * ranks!r}",))
        if got:
            (r,) = got.values()
            if "round_s" in r:
                rows[ranks] = dict(ranks=ranks, cohort=int(r["cohort"]),
                                   s_per_round=float(r["round_s"].mean()),
                                   allreduce_s=float(r["allreduce_s"].mean()),
                                   compute_s=float(r["compute_s"].mean()))
                rows[ranks]["allreduce_share"] = rows[ranks]["allreduce_s"] / rows[ranks][
                    "s_per_round"]
    for row in rows.values():
        if 1 in rows:
            row["efficiency"] = rows[1]["s_per_round"] / row["s_per_round"]
    return rows


def gpu_tests(plan: Plan) -> dict:
    """The tests marked gpu, as a child pytest, where CUDA is."""
    tests = Path(__file__).resolve().parent.parent / "tests" / "test_gpu.py"
    if plan.device != "cuda":
        plan.skip("tests marked gpu", "no CUDA device here")
        return dict(status="skipped", reason="no CUDA device")
    if not tests.exists():
        plan.skip("tests marked gpu", f"{tests} not found (run from a checkout)")
        return dict(status="skipped", reason="tests/test_gpu.py not found")
    if not plan.fits("tests marked gpu", GPU_TESTS_S):
        return dict(status="skipped", reason="budget")
    print(f"hpcfl.bench suite: tests marked gpu (estimated {GPU_TESTS_S:.0f} s) ...", flush=True)
    log = plan.out / "gpu-tests.log"
    rc, took = child([sys.executable, "-m", "pytest", "-m", "gpu", str(tests), "-q", "-rfE",
                      "-p", "no:cacheprovider", "-o", "addopts="], log,
                     min(plan.left(), 2 * GPU_TESTS_S))
    last = [s for s in log.read_text().splitlines() if s.strip()][-1:] or [""]
    status = "passed" if rc == 0 else ("killed" if rc == -9 else "failed")
    print(f"  {status} in {took:.0f} s: {last[0]}", flush=True)
    return dict(status=status, summary=last[0], seconds=took, log=str(log))


def auto_choice(cells: dict) -> tuple[str, str]:
    """engine.mode=auto's choice from the measured numbers: the mode faster on the default
    run's round (hpcfl.engine.resolve_mode's rule), with the tally over every workload."""
    faster = {}
    for name, got in cells.items():
        s = {v["mode"]: float(v["round_s"].mean()) for v in got.values()
             if v["dtype"] == "fp32" and not v["compile"] and len(v.get("round_s", ()))}
        if len(s) == 2:
            faster[name] = (min(s, key=s.get), s)
    if not faster:
        return "", "nothing measured in both modes"
    pick = faster[MAIN][0] if MAIN in faster else max(
        ("sequential", "vectorized"), key=lambda m: sum(f == m for f, _ in faster.values()))
    tally = ", ".join(f"{n}: {f} ({s['sequential']:.3g} vs {s['vectorized']:.3g} s/round)"
                      for n, (f, s) in faster.items())
    return pick, tally


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcfl.bench suite",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--budget", type=float, default=480.0, help="seconds (default 480)")
    p.add_argument("--out", default="bench-suite", help="folder (default %(default)s)")
    p.add_argument("--scale", default="auto", choices=("auto", "tiny", "full"),
                   help="the workloads as defined (full), smaller (tiny), or full on CUDA and "
                   "tiny elsewhere (auto, the default)")
    a = p.parse_args(argv)
    if a.budget < 10:
        print("hpcfl.bench: error: --budget: at least 10 seconds", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = a.scale if a.scale != "auto" else ("full" if device == "cuda" else "tiny")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(a.budget, device, scale, out)
    command = " ".join(["python -m hpcfl.bench suite", *argv])
    print(f"hpcfl.bench suite: {a.budget:.0f} s on {device}, {scale} workloads", flush=True)
    cells: dict = {}
    core = [("sequential", "fp32", False), ("vectorized", "fp32", False)]
    if (got := bench(plan, MAIN, core, "modes")) is not None:
        cells[MAIN] = got
    tests = gpu_tests(plan)
    mode = auto_choice(cells)[0] or ("vectorized" if device == "cuda" else "sequential")
    rows = scaling(plan, mode)
    others = sorted((n for n in SUITE if n != MAIN), key=lambda n: plan.round_s(n))
    for name in others:
        if (got := bench(plan, name, core, "modes")) is not None:
            cells[name] = got
    for name in [n for n in [MAIN, *others] if n in cells]:
        todo = variants(device)
        while todo and plan.estimate(name, todo, 1 if scale == "tiny" else 2) > plan.left():
            m, d, c = todo.pop()
            plan.skip(f"{name} {m} {d} compile={'on' if c else 'off'}", "does not fit in the "
                      f"{max(plan.left(), 0):.0f} s left")
        if todo and (got := bench(plan, name, todo, "variants")) is not None:
            cells[name].update(got)
    if device == "cpu":
        plan.skip("engine.dtype=tf32", "TF32 is a CUDA matmul mode: on the CPU it is fp32")
    pick, tally = auto_choice(cells)
    wall = time.perf_counter() - plan.t0
    facts = report.machine(device)
    report.write(out, dict(command=command, budget_s=a.budget, wall_s=wall, scale=scale,
                                 device=device, auto_mode=pick, auto_tally=tally, **facts),
                       {n: (overrides(plan, n), c) for n, c in cells.items()}, rows, tests,
                       plan.skipped)
    print(report.auto_line(device, pick, tally))
    print(f"-> {out / 'suite.h5'}, {out / 'suite.md'} ({wall:.0f} s of {a.budget:.0f})")
    measured = sum(1 for c in cells.values() for v in c.values() if "round_s" in v)
    return 0 if measured and tests.get("status") in ("passed", "skipped") else 1

