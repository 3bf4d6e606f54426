"""What `python -m hpcfl.bench suite` writes: DIR/suite.h5 and DIR/suite.md (a table
docs/performance.md can take as it is), and the facts about the machine both carry.

    /                      attrs: command, budget_s, wall_s, scale, device, auto_mode,
                           auto_tally, host, platform, cpu, cores, memory_gb, gpu, torch_version,
                           cuda_version, cudnn_version, python_version, hpcfl_version, git_commit
    /cells/<workload>/<cell>   round_s, compute_s, allreduce_s, eval_s (timed rounds, rank 0);
                           attrs: mode, dtype, compile, s_per_round, client_updates_per_s,
                           peak_mem_bytes, max_abs_diff[, max_abs_diff_fp32], cohort, or error
    /cells/<workload>      attrs: overrides (the key=value the suite added to the workload)
    /scaling/<ranks>       attrs: ranks, cohort, s_per_round, compute_s, allreduce_s,
                           allreduce_share, efficiency (1 rank's s/round over this one's)
    /gpu_tests             attrs: status (passed, failed, killed, skipped), summary or reason
    /skipped               what was not run, and why (one string each)
"""
from __future__ import annotations

import os
import platform
import socket
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from . import __version__
from .engine import AUTO_MODE
from .store import git_commit


def machine(device: str) -> dict:
    """The machine and the software the numbers come from."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem = next((int(line.split()[1]) / 2**20 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), 0.0)
    gpu = "none"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
               f"{torch.cuda.device_count()} device(s)")
    return dict(host=socket.gethostname(), platform=platform.platform(), cpu=cpu,
                cores=len(os.sched_getaffinity(0)), memory_gb=round(mem, 1), gpu=gpu,
                torch_version=str(torch.__version__), cuda_version=torch.version.cuda or "none",
                cudnn_version=str(torch.backends.cudnn.version() or "none"),
                python_version=platform.python_version(), hpcfl_version=__version__,
                git_commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M %Z"))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def auto_line(device: str, pick: str, tally: str) -> str:
    if not pick:
        return f"engine.mode=auto on {device}: no choice ({tally})"
    now = AUTO_MODE.get(device, "?")
    verdict = "agrees" if now == pick else f"disagrees: set AUTO_MODE[{device!r}] = {pick!r}"
    return (f"engine.mode=auto on {device}: {pick}, from the measured numbers ({tally}); "
            f"hpcfl.engine.AUTO_MODE[{device!r}] is {now!r}: {verdict}")


def write(out: Path, attrs: dict, cells: dict, rows: dict, tests: dict,
          skipped: list[str]) -> None:
    """suite.h5 and suite.md. cells: workload -> (overrides, {cell name: bench attrs})."""
    with h5py.File(out / "suite.h5", "w") as f:
        f.attrs.update(attrs)
        for name, (over, got) in cells.items():
            w = f.create_group(f"cells/{name}")
            w.attrs["overrides"] = " ".join(over)
            for cell, v in got.items():
                g = w.create_group(cell)
                for k in ("round_s", "compute_s", "allreduce_s", "eval_s"):
                    if k in v:
                        g[k] = v[k]
                g.attrs.update({k: v[k] for k in v if not isinstance(v[k], np.ndarray)})
                if len(v.get("round_s", ())):
                    g.attrs["s_per_round"] = float(v["round_s"].mean())
        for ranks, row in rows.items():
            f.create_group(f"scaling/{ranks}").attrs.update(row)
        f.create_group("gpu_tests").attrs.update(
            {k: v for k, v in tests.items() if isinstance(v, (str, int, float))})
        f["skipped"] = np.array(skipped or [""], dtype=h5py.string_dtype())
    (out / "suite.md").write_text(markdown(attrs, cells, rows, tests, skipped))


def _order(v: dict) -> tuple:
    """fp32, tf32, bf16; eager before compiled; sequential before vectorized."""
    return (("fp32", "tf32", "bf16").index(v["dtype"]), bool(v["compile"]), v["mode"])


def _num(v, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def markdown(attrs: dict, cells: dict, rows: dict, tests: dict, skipped: list[str]) -> str:
    a = attrs
    lines = [f"`{a['command']}`: {a['wall_s']:.0f} s of a {a['budget_s']:.0f} s budget, "
             f"{a['scale']} workloads, {a['date']}.", "",
             f"Machine: {a['cpu']} ({a['cores']} cores, {a['memory_gb']:.0f} GB), GPU: "
             f"{a['gpu']}; torch {a['torch_version']}, CUDA {a['cuda_version']}, cuDNN "
             f"{a['cudnn_version']}, Python {a['python_version']}, hpcfl {a['hpcfl_version']} "
             f"({a['git_commit'][:10] or 'no git'}).", "",
             "| workload | mode | dtype | compile | cohort | s/round | client updates/s | "
             "peak MiB | max_abs_diff |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (over, got) in cells.items():
        for v in sorted(got.values(), key=_order):
            head = (f"| {name} | {v['mode']} | {v['dtype']} | "
                    f"{'on' if v['compile'] else 'off'} | ")
            if "error" in v:
                lines.append(head + f"failed: {v['error']} | | | | |")
                continue
            lines.append(head + f"{int(v['cohort'])} | {_num(float(v['round_s'].mean()), '.3g')}"
                         f" | {_num(float(v['client_updates_per_s']), '.3g')} | "
                         f"{v['peak_mem_bytes'] / 2**20:.0f} | "
                         f"{_num(v.get('max_abs_diff'), '.1e')} |")
    lines += ["", "Workload overrides: " + "; ".join(
        f"{n}: `{' '.join(over)}`" for n, (over, _) in cells.items()), ""]
    if rows:
        lines += ["Weak scaling (pfl-cifar10-fedavg, the same cohort per rank, the ranks sharing "
                  "the device; efficiency: 1 rank's s/round over N ranks'):", "",
                  "| ranks | cohort | s/round | allreduce s | allreduce share | efficiency |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['ranks']} | {r['cohort']} | {r['s_per_round']:.3g} | "
                  f"{r['allreduce_s']:.3g} | {r['allreduce_share']:.1%} | "
                  f"{_num(r.get('efficiency'), '.2f')} |" for r in rows.values()]
        lines.append("")
    lines.append(f"Tests marked gpu: {tests.get('status')}"
                 f"{': ' + tests['summary'] if tests.get('summary') else ''}"
                 f"{' (' + tests['reason'] + ')' if tests.get('reason') else ''}.")
    lines += ["", auto_line(a["device"], a["auto_mode"], a["auto_tally"]) + ".", ""]
    if skipped:
        lines += ["Skipped:", *[f"- {s}" for s in skipped], ""]
    return "\n".join(lines)
