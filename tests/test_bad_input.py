"""Bad input to the five command-line tools (issue 22), as a table: every case must end with exit
code 2 and exactly one line on stderr that starts with the tool's prefix and names the problem,
no traceback, and nothing written (every file under the case's folder, before and after, the
same bytes: no results file, no CSV, no prepared file, a file that was there unchanged).

The cases call each tool's main(argv) in this process (seconds for all of them); two run as
real `python -m` processes, for the entry points' wiring and the stderr a user sees. Bad inputs
covered elsewhere are not repeated: tests/test_config.py (bad override values, a missing config
file, a section that is not a mapping), tests/test_guards.py (an output folder that cannot be
written, a held lock), tests/test_prepare.py (damaged source files), tests/test_summarize.py
(an empty folder), tests/test_attack_cli.py (idlg on hyperfl)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import pytest

import hpcfl.data
import hpcfl.population
from analysis.summarize import main as summarize
from hpcfl.attack import main as attack
from hpcfl.data.prepare import main as prepare
from hpcfl.main import main
from hpcfl.sweep import main as sweep

from .conftest import TINY, logging_to_stderr
from .datafiles import write_cifar10, write_mnist_like

TOOLS = {"main": (main, "hpcfl: error: "),
         "attack": (attack, "hpcfl.attack: error: "),
         "sweep": (sweep, "hpcfl.sweep: error: "),
         "prepare": (prepare, "hpcfl.data.prepare: error: "),
         "summarize": (summarize, "analysis.summarize: error: ")}
DIR = object()  # a `files` entry that is a folder
GB = 1e9


@dataclass
class Case:
    """`args` with {tmp} for the case's folder; `files` made there first (text, bytes, DIR, or a
    function of the path and the real results file); `memory`: GB available, as if this machine
    had that much free."""
    id: str
    tool: str
    args: list[str]
    expect: str
    files: dict[str, object] = field(default_factory=dict)
    memory: float | None = None


OUT = "output.dir={tmp}/runs"


def fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def truncated(path: Path, real: Path) -> None:
    """A real results file cut in half (a copy interrupted, a full disk)."""
    data = real.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def foreign_hdf5(path: Path, real: Path) -> None:
    """An HDF5 file of another program: no config, no metrics."""
    with h5py.File(path, "w") as f:
        f["x"] = [1, 2, 3]


def mnist_source(path: Path, real: Path) -> None:
    """The MNIST files as distributed (a later entry of `files` may replace one)."""
    write_mnist_like(path, "mnist", gz=False)


def cifar_meta_not_utf8(path: Path, real: Path) -> None:
    """CIFAR-10 whose batches.meta names its classes in bytes that are not UTF-8."""
    write_cifar10(path)
    with open(path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [b"airplane", b"\xff\xfeauto"]}, f, protocol=2)


NOT_UTF8 = b"train:\n  device: cpu   # caf\xe9 in Latin-1\n"
MAIN = [
    # YAML files
    Case("yaml syntax", "main", ["{tmp}/c.yaml", OUT], "not valid YAML",
         {"c.yaml": "train: {lr: 0.1\n"}),
    Case("yaml not utf-8", "main", ["{tmp}/c.yaml", OUT], "not UTF-8 text (byte 0xe9",
         {"c.yaml": NOT_UTF8}),
    Case("yaml empty", "main", ["{tmp}/c.yaml", OUT], "c.yaml is empty", {"c.yaml": ""}),
    Case("yaml only comments", "main", ["{tmp}/c.yaml", OUT], "c.yaml is empty",
         {"c.yaml": "# train: {rounds: 3}\n"}),
    Case("yaml top level list", "main", ["{tmp}/c.yaml", OUT],
         "expected a mapping of sections, got list", {"c.yaml": "- train\n- data\n"}),
    Case("config is a directory", "main", ["{tmp}/c.yaml", OUT], "c.yaml is a directory",
         {"c.yaml": DIR}),
    Case("yaml unknown section", "main", ["{tmp}/c.yaml", OUT],
         "unknown section 'optimizer'", {"c.yaml": "optimizer: {lr: 0.1}\n"}),
    Case("yaml unknown key", "main", ["{tmp}/c.yaml", OUT],
         "unknown key 'train.learning_rate'", {"c.yaml": "train: {learning_rate: 0.1}\n"}),
    Case("yaml list for an int", "main", ["{tmp}/c.yaml", OUT],
         "train.rounds: expected int, got [1, 2]", {"c.yaml": "train: {rounds: [1, 2]}\n"}),
    # NaN and inf: they pass every range check, and the run would diverge (exit 3) later
    Case("yaml .nan", "main", ["{tmp}/c.yaml", OUT], "train.lr: nan is not a finite number",
         {"c.yaml": "train: {lr: .nan}\n"}),
    Case("yaml .inf", "main", ["{tmp}/c.yaml", OUT],
         "train.weight_decay: inf is not a finite number",
         {"c.yaml": "train: {weight_decay: .inf}\n"}),
    Case("lr=nan", "main", ["train.lr=nan", OUT], "train.lr: nan is not a finite number"),
    Case("lr=inf", "main", ["train.lr=inf", OUT], "train.lr: inf is not a finite number"),
    Case("lr of 400 digits", "main", ["train.lr=1" + "0" * 400, OUT],
         "train.lr: inf is not a finite number"),
    Case("bool=maybe", "main", ["output.overwrite=maybe", OUT],
         "output.overwrite: expected bool, got 'maybe'"),
    # sizes
    Case("num_clients=-3", "main", ["data.num_clients=-3", OUT],
         "data.num_clients: -3 is out of range; must be >= 1"),
    Case("batch_size=0", "main", ["train.batch_size=0", OUT],
         "train.batch_size: 0 is out of range; must be >= 1"),
    Case("num_clients=1.0e+12", "main", ["data.num_clients=1.0e+12", OUT],
         "data.num_clients: expected int, got 1000000000000.0"),
    Case("10**12 sampled clients", "main",
         ["data.partition=sampled", f"data.num_clients={10 ** 12}", OUT],
         "the sizes of data.num_clients=1,000,000,000,000 clients need about 16,000.0 GB"),
    Case("10**12 synthetic images", "main",
         ["data.name=synthetic-cifar10", f"data.synthetic_samples={10 ** 12}", OUT],
         "data.synthetic_samples=1,000,000,000,000 images need about 3,080,000.0 GB"),
    # HyperFL on synthetic-mnist keeps 5,416 bytes a client: 10M clients are 54 GB
    Case("10M hyperfl clients in 8 GB", "main",
         [*TINY, "data.name=synthetic-mnist", "data.partition=sampled",
          "data.num_clients=10000000", OUT],
         "the private state of the 10,000,000 clients a rank hosts (5,417 bytes each once "
         "trained) and their placement need about 54.2 GB of memory, and 8.0 GB is available",
         memory=8),
    # --from
    Case("--from a directory", "main", ["--from", "{tmp}/r.h5", OUT], "r.h5: not an hpcfl results file (a directory)",
         {"r.h5": DIR}),
    Case("--from not hdf5", "main", ["--from", "{tmp}/r.h5", OUT], "file signature not found",
         {"r.h5": "status: completed\n"}),
    Case("--from missing", "main", ["--from", "{tmp}/r.h5", OUT], "No such file"),
]

ATTACK = [
    Case("unknown attack", "attack", ["attack.name=gradinv", OUT],
         "attack.name: 'gradinv' is not one of ig, dlg, idlg, gifd"),
    Case("unknown threat", "attack", ["attack.threat=black-box", OUT],
         "attack.threat: 'black-box' is not one of server, white-box"),
    Case("round 0", "attack", ["attack.round=0", OUT], "attack.round: 0 is out of range"),
    Case("round past the run", "attack", ["attack.round=5", "train.rounds=2", OUT],
         "attack.round=5 is past the run's train.rounds=2"),
    Case("attack lr=nan", "attack", ["attack.lr=nan", OUT],
         "attack.lr: nan is not a finite number"),
    Case("gifd without a generator", "attack", ["attack.name=gifd", OUT],
         "attack.name=gifd needs attack.generator=FILE"),
    Case("generator is a directory", "attack",
         ["attack.name=gifd", "attack.generator={tmp}/g.pt", OUT], "Is a directory",
         {"g.pt": DIR}),
    Case("results file is a directory", "attack", ["output.name=a", OUT],
         "runs/a.h5 exists and is not an hpcfl results file (a directory)", {"runs/a.h5": DIR}),
    Case("results file not hdf5", "attack", ["output.name=a", OUT],
         "runs/a.h5 exists and is not an hpcfl results file", {"runs/a.h5": "my notes\n"}),
    Case("config not utf-8", "attack", ["{tmp}/c.yaml", OUT], "not UTF-8 text",
         {"c.yaml": NOT_UTF8}),
    Case("10**12 clients", "attack",
         ["data.partition=sampled", f"data.num_clients={10 ** 12}", OUT],
         "data.num_clients=1,000,000,000,000 clients need about 16,000.0 GB"),
]

SWEEP_LIST = ["{tmp}/s.yaml", "--list", OUT]
SWEEP = [
    Case("missing", "sweep", SWEEP_LIST, "sweep file not found"),
    Case("a directory", "sweep", SWEEP_LIST, "s.yaml is a directory", {"s.yaml": DIR}),
    Case("not utf-8", "sweep", SWEEP_LIST, "not UTF-8 text (byte 0xe9",
         {"s.yaml": b"grid: {train.seed: [0, 1]}  # caf\xe9\n"}),
    Case("yaml syntax", "sweep", SWEEP_LIST, "not valid YAML",
         {"s.yaml": "grid: {train.seed: [0, 1}\n"}),
    Case("empty", "sweep", SWEEP_LIST, "s.yaml is empty", {"s.yaml": "\n"}),
    Case("top level list", "sweep", SWEEP_LIST, "not a list",
         {"s.yaml": "- {train.seed: 0}\n"}),
    Case("unknown top-level key", "sweep", SWEEP_LIST, "not grids",
         {"s.yaml": "grids: {train.seed: [0]}\n"}),
    Case("grid unknown key", "sweep", SWEEP_LIST,
         "point 0 (train.lrr=0.1): unknown key 'train.lrr'",
         {"s.yaml": "grid: {train.lrr: [0.1, 0.2]}\n"}),
    Case("grid empty list", "sweep", SWEEP_LIST, "grid maps dotted keys to non-empty lists",
         {"s.yaml": "grid: {train.seed: []}\n"}),
    Case("grid nan", "sweep", SWEEP_LIST,
         "point 1 (train.lr=nan): train.lr: nan is not a finite number",
         {"s.yaml": "grid: {train.lr: [0.1, .nan]}\n"}),
    Case("points not a list", "sweep", SWEEP_LIST, "points is a list of mappings",
         {"s.yaml": "points: {train.seed: 0}\n"}),
    Case("base file missing", "sweep", SWEEP_LIST, "config file not found: nothere.yaml",
         {"s.yaml": "base: nothere.yaml\ngrid: {train.seed: [0]}\n"}),
    Case("base a list", "sweep", SWEEP_LIST, "base: expected a mapping of sections, got list",
         {"s.yaml": "base: [1, 2]\n"}),
    Case("--index not a number", "sweep", ["{tmp}/s.yaml", "--index", "x", OUT],
         "argument --index: invalid int value: 'x'", {"s.yaml": "grid: {train.seed: [0]}\n"}),
    Case("neither --list nor --index", "sweep", ["{tmp}/s.yaml", OUT],
         "one of the arguments --list --index is required",
         {"s.yaml": "grid: {train.seed: [0]}\n"}),
]

SRC = ["--source", "{tmp}/src", "--out", "{tmp}/out.h5"]
PREPARE = [
    Case("unknown dataset", "prepare", ["svhn", *SRC], "invalid choice: 'svhn'"),
    Case("no --source", "prepare", ["mnist", "--out", "{tmp}/out.h5"],
         "the following arguments are required: --source"),
    Case("source is a file", "prepare", ["mnist", *SRC], "not a directory", {"src": "x"}),
    Case("source missing", "prepare", ["mnist", *SRC], "src: no such directory"),
    Case("input file is a directory", "prepare", ["mnist", *SRC],
         "train-images-idx3-ubyte is a directory, not a file",
         {"src/MNIST/raw/train-images-idx3-ubyte": DIR}),
    Case("out is a directory", "prepare", ["mnist", *SRC[:3], "{tmp}/out"],
         "--out {tmp}/out is a directory", {"src": DIR, "out": DIR}),
    Case("out below a file", "prepare", ["mnist", *SRC[:3], "{tmp}/afile/mnist.h5"],
         "{tmp}/afile is a file, not a folder", {"src": mnist_source, "afile": "x"}),
    Case("cifar names not utf-8", "prepare", ["cifar10", *SRC],
         "label_names are not UTF-8 text", {"src": cifar_meta_not_utf8}),
    Case("foreign input, out kept", "prepare", ["mnist", *SRC], "not an idx file",
         {"src": mnist_source,
          "src/MNIST/raw/train-images-idx3-ubyte": b"\x89PNG\r\n\x1a\n" + bytes(64),
          "out.h5": "a file prepared before: it stays\n"}),
]

SUMMARIZE = [
    Case("folder without results", "summarize", ["{tmp}/runs"], "no readable results file",
         {"runs/r.ckpt.h5": "a checkpoint is not a run\n", "runs/notes.txt": "notes\n"}),
    Case("non-hdf5 .h5", "summarize", ["{tmp}/runs"],
         "unreadable: r.h5 (OSError: Unable to synchronously open file (file signature not "
         "found))", {"runs/r.h5": "plain text\n"}),
    Case("truncated .h5", "summarize", ["{tmp}/runs"], "r.h5 (OSError: Unable to "
         "synchronously open file (truncated file", {"runs/r.h5": truncated}),
    Case("another program's hdf5", "summarize", ["{tmp}/runs"], "r.h5 (KeyError",
         {"runs/r.h5": foreign_hdf5}),
    Case("named file not hdf5", "summarize", ["{tmp}/notes.txt"],
         "notes.txt (OSError: Unable to synchronously open file (file signature not found",
         {"notes.txt": "notes\n"}),
    Case("missing folder", "summarize", ["{tmp}/runs"], "no such file or folder: {tmp}/runs"),
    Case("--csv is a directory", "summarize", ["{tmp}/runs", "--csv", "{tmp}/table"],
         "--csv {tmp}/table: not a file that can be written",
         {"runs/r.h5": truncated, "table": DIR}),
    Case("--plot is a file", "summarize", ["{tmp}/runs", "--plot", "{tmp}/figs"],
         "--plot {tmp}/figs is a file", {"runs": DIR, "figs": "x"}),
    Case("unknown option", "summarize", ["{tmp}/runs", "--pdf", "x"],
         "unrecognized arguments: --pdf x", {"runs": DIR}),
    Case("no arguments", "summarize", [], "the following arguments are required: dirs"),
]

CASES = [*MAIN, *ATTACK, *SWEEP, *PREPARE, *SUMMARIZE]


@pytest.fixture(scope="module")
def real_results(tmp_path_factory) -> Path:
    """A results file of a real (tiny) run, for the damaged copies."""
    out = tmp_path_factory.mktemp("real")
    assert main([*TINY, "algorithm.name=fedavg", "train.rounds=1", "train.local_steps=1",
                 f"output.dir={out}", "output.name=r"]) == 0
    return out / "r.h5"


def make(tmp: Path, files: dict, real: Path) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            path.mkdir()
        elif callable(content):
            content(path, real)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())


def snapshot(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp)): p.read_bytes() for p in tmp.rglob("*") if p.is_file()}


def available(monkeypatch, gb: float) -> None:
    """As if this machine had `gb` GB of memory free (every place that asks)."""
    for module in (hpcfl.data, hpcfl.population):
        monkeypatch.setattr(module, "available_memory", lambda: int(gb * GB))


def one_error_line(err: str, prefix: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and lines[0] != prefix, err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.tool}: {c.id}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch,
                                                         real_results):
    make(tmp_path, case.files, real_results)
    before = snapshot(tmp_path)
    if case.memory is not None:
        available(monkeypatch, case.memory)
    monkeypatch.chdir(tmp_path)  # anything written to a default place lands here too
    tool, prefix = TOOLS[case.tool]
    capsys.readouterr()
    with logging_to_stderr():
        try:
            code = tool([fill(a, tmp_path) for a in case.args])
        except SystemExit as e:  # argparse's own way out (usage and error: two lines)
            code = e.code
    assert code == 2
    line = one_error_line(capsys.readouterr().err, prefix)
    assert fill(case.expect, tmp_path) in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("module, files, args, expect", [
    ("hpcfl.main", {"c.yaml": NOT_UTF8}, ["{tmp}/c.yaml", OUT],
     "hpcfl: error: config file {tmp}/c.yaml: not UTF-8 text"),
    ("hpcfl.sweep", {"s.yaml": "grid: {train.seed: [0]}\n"}, ["{tmp}/s.yaml", "--index", "x"],
     "hpcfl.sweep: error: argument --index: invalid int value: 'x'"),
], ids=["main", "sweep"])
def test_a_real_process_says_one_line(module, files, args, expect, tmp_path):
    """The entry points (`python -m`), with everything such a process prints on stderr."""
    make(tmp_path, files, None)
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", module, *[fill(a, tmp_path) for a in args]],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 2
    assert one_error_line(r.stderr, fill(expect, tmp_path))
    assert r.stdout == "" and snapshot(tmp_path) == before


def test_a_million_sampled_clients_are_still_accepted(tmp_path, capsys, monkeypatch):
    """docs/performance.md, "Scaling to many clients": the estimate refuses what cannot fit,
    not a large population. HyperFL's million clients come to 5.4 GB of rows: they fit in 8 GB,
    and a FedAvg run of a million clients (ten a round) completes."""
    from hpcfl.config import ConfigError, load_config
    from hpcfl.data import load_federated
    from hpcfl.loop import build
    from hpcfl.population import check_memory
    from hpcfl.world import World

    available(monkeypatch, 8)
    cfg = load_config(None, ["data.name=synthetic-mnist", "data.partition=sampled",
                             "data.num_clients=1000000", "train.device=cpu"])
    world = World("cpu")
    algo = build(cfg, load_federated(cfg.data, 0), world.device)
    check_memory(world, algo.init_client(0), 1_000_000)  # does not raise
    with pytest.raises(ConfigError, match="need about 54.2 GB"):
        check_memory(world, algo.init_client(0), 10_000_000)

    args = ["data.name=synthetic-mnist", "data.partition=sampled", "data.num_clients=1000000",
            "algorithm.name=fedavg", "train.frac=0.00001", "train.eval_clients=10",
            "train.rounds=1", "train.local_steps=1", "train.device=cpu",
            "output.progress=none", f"output.dir={tmp_path}", "output.name=m"]
    assert main(args) == 0
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert f.attrs["status"] == "completed" and len(f["clients/num_samples"]) == 1_000_000


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_memory_available_is_the_job_s_cgroup_limit(version, tmp_path):
    """A Slurm job's --mem is a limit on the job's cgroup, above the task's own (no limit
    there): the room is the job's limit minus its usage."""
    from hpcfl.memory import _cgroup_room

    task = "system.slice/job_7/step_0/task_0"
    if version == "v2":
        line, base, files = f"0::/{task}", "sys/fs/cgroup", ("memory.max", "memory.current")
        unlimited = "max"
    else:
        line, base = f"4:memory:/{task}", "sys/fs/cgroup/memory"
        files, unlimited = ("memory.limit_in_bytes", "memory.usage_in_bytes"), str(2 ** 63 - 4096)
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(f"9:cpu:/{task}\n{line}\n")
    for folder, limit, used in ((task, unlimited, "100"), ("system.slice/job_7", "8000", "3000"),
                                ("", unlimited, "5000")):
        d = tmp_path / base / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / files[0]).write_text(limit + "\n")
        (d / files[1]).write_text(used + "\n")
    assert _cgroup_room(tmp_path) == 5000
    (tmp_path / base / "system.slice/job_7" / files[0]).write_text(unlimited)
    assert _cgroup_room(tmp_path) is None
