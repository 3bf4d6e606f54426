import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from hpcfl.config import ConfigError, RunConfig, describe, load_config

from .conftest import run_cli, run_main

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_defaults_are_the_quickstart_job():
    """jobs/quickstart.yaml documents the no-argument run: it must not drift from the defaults."""
    assert load_config(str(JOBS / "quickstart.yaml")).to_dict() == RunConfig().to_dict()


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent("""
        data: {name: synthetic-mnist, num_clients: 7}
        train: {lr: 0.3, rounds: 4}
    """))
    cfg = load_config(str(p), ["train.lr=1", "output.overwrite=true", "train.device=cuda:1"])
    assert (cfg.data.name, cfg.data.num_clients, cfg.train.rounds) == ("synthetic-mnist", 7, 4)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted as float
    assert cfg.output.overwrite is True and cfg.train.device == "cuda:1"


def test_config_round_trips_through_yaml():
    cfg = load_config(None, ["algorithm.name=local", "data.partition=dirichlet"])
    again = load_config(None, [], base_yaml=cfg.to_yaml())
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian.lr=0.1", "unknown section 'trian' (did you mean 'train'?)"),
    ("train.rounds=abc", "train.rounds: expected int, got 'abc'"),
    ("train.rounds=2.5", "train.rounds: expected int, got 2.5"),
    ("train.rounds=true", "train.rounds: expected int, got True"),
    ("train.rounds=0", "train.rounds: 0 is out of range; must be >= 1"),
    ("train.frac=1.5", "train.frac: 1.5 is out of range; must be <= 1"),
    ("train.lr=0", "train.lr: 0.0 is out of range; must be > 0"),
    ("algorithm.name=fedprox", "algorithm.name: 'fedprox' is not one of hyperfl, fedavg, local"),
    ("data.partition=shard", "data.partition: 'shard' is not one of iid, shards, dirichlet"),
    ("train.device=gpu", "train.device: 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("output.name=a/b", "output.name: 'a/b' must be a plain file name"),
    ("lr", "bad argument 'lr': expected CONFIG.yaml or key=value"),
    ("lr=3", "bad key 'lr'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))
    p.write_text("train: {rounds: 3}\nmodel: cifar_cnn\n")
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_help_lists_every_key():
    text = describe()
    for section, body in RunConfig().to_dict().items():
        for key in body:
            assert f"{section}.{key} = " in text


@pytest.mark.parametrize("args, message", [
    (["train.lrr=0.1"], "unknown key 'train.lrr'"),
    (["train.rounds=-1"], "train.rounds: -1 is out of range"),
    # Found only once the dataset is known: still one line, exit 2, no results file.
    (["data.classes_per_client=11"], "more than the 10 classes"),
    (["data.num_clients=1000"], "1000 clients need at least 2000 samples"),
    (["model.name=cifar_cnn"], "cifar_cnn expects 3x32x32 inputs, the dataset has 1x8x8"),
    pytest.param(["train.device=cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_cli_config_errors_exit_2_with_one_line_and_no_file(tmp_path, capsys, args, message):
    """hpcfl.main.main in this process, its log lines counted (tests/test_bad_input.py: the same
    from a real `python -m hpcfl.main`)."""
    r = run_main(capsys, *args, f"output.dir={tmp_path / 'runs'}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcfl: error: ") and message in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_help_exits_0():
    r = run_cli("--help")
    assert r.returncode == 0 and "train.rounds" in r.stdout and "usage:" in r.stdout


def test_stored_config_is_yaml_of_every_key():
    tree = yaml.safe_load(RunConfig().to_yaml())
    assert tree == RunConfig().to_dict()


def test_renamed_keys_are_still_read_from_files_and_command_lines(tmp_path):
    """Configs and results files of earlier versions (privacy.clip, engine.group_size, ...)
    keep working: every old name lands on its new key, and an unknown key still does not."""
    from hpcfl.config import RENAMED, ConfigError, RunConfig

    values = {"engine.max_clients_in_memory": 7, "algorithm.clip_norm": 3.0,
              "privacy.dp_clip": 0.5, "privacy.clip": 2.0, "privacy.slice_clip": 1e-3,
              "privacy.clip_model": "local-dir:x", "privacy.clip_weights": "w.bin"}
    assert set(values) <= set(RENAMED)
    assert len(RENAMED) == len(values) + 2  # engine.group_size, engine.block_size below
    tree: dict = {}
    for key, value in values.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(tree))
    from_file = load_config(str(path))
    from_cli = load_config(None, [f"{k}={v}" for k, v in values.items()] +
                           ["engine.group_size=7", "engine.block_size=7"])
    for cfg in (from_file, from_cli):
        for old, value in values.items():
            section, name = RENAMED[old].split(".")
            assert getattr(getattr(cfg, section), name) == value, old
    assert not hasattr(RunConfig().privacy, "clip")
    with pytest.raises(ConfigError, match="privacy.clipp"):
        load_config(None, ["privacy.clipp=1"])
