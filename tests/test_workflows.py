"""The workflows as docs/cluster.md writes them: attack then finish with default names,
one default name per experiment, a file of another experiment refused naming every key (main
and sweeps), array ranges that match the sweeps, and the help that says what the code does."""
import re
from pathlib import Path

import h5py
import pytest
import yaml

import hpcfl
from hpcfl.attack import main as attack
from hpcfl.bench import main as bench
from hpcfl.config import RESUMABLE, ConfigError, RunConfig, describe, load_config, set_value
from hpcfl.engine import AUTO_MODE
from hpcfl.experiment import check_same_experiment
from hpcfl.loop import default_name
from hpcfl.main import main
from hpcfl.store import CHECKPOINT_VERSIONS, SCHEMA_VERSIONS
from hpcfl.sweep import load_sweep
from hpcfl.sweep import main as sweep

from .conftest import TINY, max_diff, results

ROOT = Path(__file__).resolve().parent.parent

def test_attack_then_main_finish_one_file_with_default_names(tmp_path, monkeypatch):
    """attack.round=1 (the default) leaves the run's start checkpointed, and hpcfl.main of the
    same config, unnamed, trains it to the end in that file: the numbers of a run never
    attacked. (Before: two different default names, and a file marked completed with no round
    in it, on which main stopped with exit 2.)"""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "photos.yaml"  # 10 clients of one photo: a cheap attack
    config.write_text(yaml.safe_dump(dict(
        data=dict(name="photos", partition="iid", num_clients=10, test_fraction=0.5),
        algorithm=dict(name="fedavg"), train=dict(rounds=2, local_epochs=1, device="cpu"),
        attack=dict(iterations=2), output=dict(progress="none"))))
    assert attack([str(config)]) == 0
    assert main([str(config)]) == 0
    (path,) = [p for p in (tmp_path / "runs").glob("*.h5") if ".ckpt" not in p.name]
    assert path.stem == default_name(load_config(str(config)))
    with h5py.File(path) as f:
        assert f.attrs["status"] == "completed" and "privacy/ig/psnr" in f
        assert f["privacy/ig"].attrs["round"] == 1 and list(f["metrics/round"][:]) == [1, 2]
    assert main([str(config), "output.name=plain"]) == 0
    assert max_diff(results(path), results(tmp_path / "runs" / "plain.h5")) == 0.0


def test_one_default_name_per_experiment(monkeypatch):
    """The same for attack and main, any job or step, and another for any other config."""
    cfg = load_config(None, TINY)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    name = default_name(cfg)
    assert name.startswith("hyperfl-digits-")
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    assert default_name(load_config(None, [*TINY, "attack.round=3", "output.dir=x"])) == name
    for other in ("train.lr=0.1", "train.seed=1", "engine.mode=vectorized", "train.rounds=3"):
        assert default_name(load_config(None, [*TINY, other])) != name, other


def test_a_completed_file_of_another_experiment_is_refused_naming_each_key(tmp_path, capsys):
    """hpcfl.main: with its checkpoint, and without (checkpoints removed): the same config is
    reported done, another one refused with one line naming every key that differs."""
    args = [*TINY, "train.rounds=1", f"output.dir={tmp_path}", "output.name=x"]
    assert main(args) == 0
    for ckpt in tmp_path.glob("x.ckpt*.h5"):
        ckpt.unlink()
    before = (tmp_path / "x.h5").read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert "already completed (1 rounds)" in capsys.readouterr().out
    assert main([*args, "train.lr=0.1", "train.seed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "train.lr: 0.1 differs from 0.05" in err and "train.seed: 1 differs from 0" in err
    assert (tmp_path / "x.h5").read_bytes() == before


def test_a_sweep_point_finished_by_another_sweep_is_refused(tmp_path, capsys):
    """Two sweeps of one name in one folder: the second's point is refused, naming the key,
    not reported as already done with the first one's numbers."""
    def write(lr):
        spec = dict(name="same", base=dict(data=dict(num_clients=4), train=dict(
            rounds=1, local_steps=1, lr=lr, device="cpu"), output=dict(
            progress="none", dir=str(tmp_path / "runs"))), points=[{"train.seed": 0}])
        path = tmp_path / f"lr{lr}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    assert sweep([write(0.05), "--index", "0"]) == 0
    assert (tmp_path / "runs" / "same-000.h5").exists()
    capsys.readouterr()
    assert sweep([write(0.05), "--index", "0"]) == 0
    assert "already completed" in capsys.readouterr().out
    assert sweep([write(0.1), "--index", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr: 0.1 differs from 0.05" in err, err


def array_suggestions() -> list[tuple[str, int, str]]:
    """Every `--array=0-N ... slurm/sweep.sbatch SWEEP` written in the repository's scripts,
    job files and docs: (where, N, sweep file)."""
    pattern = re.compile(r"--array=0-(\d+)(?:%\d+)?\s+slurm/sweep\.sbatch\s+(\S+\.yaml)")
    found = []
    for path in [*(p for p in ROOT.glob("slurm/**/*") if p.is_file()), *ROOT.glob("jobs/**/*.yaml"), *ROOT.glob("docs/*.md"),
                 ROOT / "README.md"]:
        for m in pattern.finditer(path.read_text()):
            found.append((path.name, int(m.group(1)), m.group(2)))
    return found


def test_every_suggested_array_range_is_the_sweeps_points():
    """(slurm/sweep.sbatch suggested 0-20 for the 22 points of jobs/privacy/sweep.yaml.)"""
    found = array_suggestions()
    assert any(where == "sweep.sbatch" for where, _, _ in found)
    for where, last, sweep_file in found:
        _, points = load_sweep(str(ROOT / sweep_file))
        assert last == len(points) - 1, f"{where}: --array=0-{last} for {sweep_file}"


def test_shipped_sweeps_write_distinct_files():
    """Each shipped sweep names its files: two of them in one folder cannot mix."""
    names = [load_sweep(str(p))[0].get("name") for p in ROOT.glob("jobs/**/sweep.yaml")]
    assert None not in names and len(set(names)) == len(names) >= 4


@pytest.mark.parametrize("value", ["data.test_fraction=1", "data.public_fraction=1"])
def test_a_range_edge_that_leaves_no_client_a_training_image_is_refused(value):
    """(test_fraction=1 ran, one training image a client, and reported success; with
    partition=sampled it crashed dividing by zero.)"""
    with pytest.raises(ConfigError, match="out of range; must be .*< 1"):
        load_config(None, [*TINY, value])


def another_value(section: str, key: str, value):
    """A value of `section.key` other than `value` that the key accepts."""
    f = RunConfig.__dataclass_fields__[section].default_factory.__dataclass_fields__[key]
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    return value + "x"


def test_the_resume_help_names_exactly_the_keys_a_resume_may_change():
    """output.resume's help lists RESUMABLE, and those are the keys, and the only ones, that
    check_same_experiment lets a resume change (one key changed at a time)."""
    stored = RunConfig()
    help_text = describe()
    help_text = help_text[help_text.index("output.resume"):help_text.index("output.progress")]
    assert all(k in help_text for k in RESUMABLE)
    allowed, sections = set(), stored.to_dict()
    for section, keys in sections.items():
        for key, value in keys.items():
            now = RunConfig()
            set_value(now, f"{section}.{key}", another_value(section, key, value))
            try:
                check_same_experiment(stored, now, "f")
                allowed.add(f"{section}.{key}")
            except ConfigError:
                pass
    assert allowed == {"train.rounds", "train.eval_every", "train.device",
                       "train.collective_timeout_s"} | {
        f"{s}.{k}" for s in ("engine", "output", "attack") for k in sections[s]}


def test_help_says_what_the_code_does(capsys):
    """engine.mode=auto is a fixed choice per device (not measured at run time), top-k's help
    makes no claim the measurements contradict, and hpcfl.bench --help names its two other
    benches; bench suite --help is whole."""
    text = describe()
    mode = text[text.index("engine.mode"):text.index("engine.stack_size")]
    assert "fixed" in mode and all(f"{m} on {d}" in " ".join(mode.split())
                                   for d, m in AUTO_MODE.items())
    assert "lost nothing" not in text
    for argv in (["--help"], ["suite", "--help"]):
        with pytest.raises(SystemExit):
            bench(argv)
    out = capsys.readouterr().out
    assert "python -m hpcfl.bench population" in out and "python -m hpcfl.bench suite" in out
    assert "5. every workload measured in 4 again" in out


def test_hpcfl_is_at_least_the_release_of_its_file_formats():
    """(The checkpoint's version 3 shipped as hpcfl 0.2.0.)"""
    def key(v):
        return tuple(int(x) for x in v.split("."))
    newest = max([*SCHEMA_VERSIONS.values(), *CHECKPOINT_VERSIONS.values()], key=key)
    assert key(hpcfl.__version__) >= key(newest)
