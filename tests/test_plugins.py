"""A user's algorithm, defense or attack from their own module, outside the package, named as
module:Class (docs/extending.md): it runs from the commands, on every rank, and a mistake in
naming it is one line and exit code 2 before any file is written."""
import os
import sys
import textwrap
from pathlib import Path

import h5py
import pytest
import yaml

from hpcfl.attack import main as attack
from hpcfl.bench import main as bench
from hpcfl.config import ConfigError, load_config
from hpcfl.main import main
from hpcfl.sweep import main as sweep

from .conftest import TINY, run_mpi

ROOT = Path(__file__).resolve().parent.parent
# The examples of docs/extending.md, and classes of the wrong kind. Halve leaves a file per
# process that ran its upload hook, so that a test sees which ranks used it.
MODULE = textwrap.dedent('''
    import os
    from pathlib import Path

    import torch

    from hpcfl.algorithms.fedavg import FedAvg
    from hpcfl.privacy.attacks import Attack, Reconstruction
    from hpcfl.privacy.defenses import Defense


    class Halve(Defense):
        def upload(self, upload, client):
            (Path(__file__).parent / f"upload-{os.getpid()}").touch()
            return {k: v * 0.5 for k, v in upload.items()}

        def attrs(self):
            return {"halve_factor": 0.5}


    class HalfStep(FedAvg):
        def server_step(self, shared, upload_sum, weight):
            super().server_step(shared, upload_sum, 2 * weight)


    class Blank(Attack):
        def reconstruct(self, problem, bar=None):
            n, shape = problem.num_images, problem.know.shape
            x = ((problem.know.low + problem.know.high) / 2).expand(n, *shape)
            return Reconstruction(x, torch.zeros(n, dtype=torch.long), float("nan"))


    class NotOne:
        pass
''')


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """The folder of `mydef.py` (MODULE), on this process's path (and PYTHONPATH, for the
    processes it starts); the working directory is tmp_path."""
    folder = tmp_path / "lab"
    folder.mkdir()
    (folder / "mydef.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(ROOT),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(tmp_path)
    yield folder
    sys.modules.pop("mydef", None)


def test_a_defense_and_an_algorithm_from_a_users_module_run_on_two_ranks(plugins, tmp_path):
    """python -m hpcfl.main, as a real job of two ranks: each imports the user's module."""
    r = run_mpi(2, *TINY, "train.rounds=1", "algorithm.name=mydef:HalfStep",
                "privacy.defense=mydef:Halve", f"output.dir={tmp_path}", "output.name=p")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "p.h5") as f:
        assert f.attrs["status"] == "completed" and f.attrs["world_size"] == 2
        assert f.attrs["halve_factor"] == 0.5  # the user's defense made the file's attrs
        stored = yaml.safe_load(f.attrs["config"])
        assert stored["privacy"]["defense"] == "mydef:Halve"
        assert stored["algorithm"]["name"] == "mydef:HalfStep"
    assert len(list(plugins.glob("upload-*"))) == 2  # both ranks trained through its hook


@pytest.mark.parametrize("args, line", [
    (["privacy.defense=nomod:Halve"], "privacy.defense=nomod:Halve: no module 'nomod' on the "
                                      "Python path"),
    (["privacy.defense=mydef:Nope"], "privacy.defense=mydef:Nope: module mydef ("),
    (["privacy.defense=mydef:NotOne"], "NotOne is not a subclass of "
                                       "hpcfl.privacy.defenses.base.Defense"),
    (["algorithm.name=mydef:Halve"], "Halve is not a subclass of hpcfl.algorithms.base.Algorithm"),
    (["privacy.defense=my:def:Halve"], "'my:def:Halve' is not module:Class"),
])
def test_a_wrong_class_is_one_line_and_exit_2(plugins, tmp_path, capsys, args, line):
    assert main([*TINY, *args, f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and line in err, err
    assert not list(tmp_path.glob("*.h5"))


def test_every_command_checks_a_users_class(plugins, tmp_path, capsys):
    """hpcfl.attack, hpcfl.sweep --list and hpcfl.bench refuse as hpcfl.main does; a sweep of
    a user's defense lists its points."""
    assert attack([*TINY, "attack.name=mydef:Halve", f"output.dir={tmp_path}"]) == 2
    assert "Halve is not a subclass of hpcfl.privacy.attacks.plugin.Attack" in (
        capsys.readouterr().err)
    spec = dict(base=dict(train=dict(rounds=1)),
                grid={"privacy.defense": ["mydef:Halve", "mydef:NotOne"]})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert sweep(["s.yaml", "--list"]) == 2
    err = capsys.readouterr().err
    assert "point 1 (privacy.defense=mydef:NotOne)" in err and "not a subclass" in err
    spec["grid"]["privacy.defense"] = ["none", "mydef:Halve"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert sweep(["s.yaml", "--list"]) == 0
    assert "privacy.defense=mydef:Halve" in capsys.readouterr().out
    assert bench(["algorithm.name=nomod:X", "--out", str(tmp_path / "b.h5")]) == 2
    assert "no module 'nomod'" in capsys.readouterr().err


def test_a_users_attack_writes_its_results_into_the_run(plugins, tmp_path, capsys):
    """The no-argument attack's run (one step on one digit), attacked by the user's Blank."""
    assert attack(["attack.name=mydef:Blank", f"output.dir={tmp_path}",
                   "output.progress=none"]) == 0
    assert capsys.readouterr().out.startswith("mydef:Blank on fedavg")
    (path,) = [p for p in tmp_path.glob("*.h5") if ".ckpt" not in p.name]
    with h5py.File(path) as f:
        g = f["privacy/mydef:Blank"]
        assert g["reconstruction"].shape == g["truth"].shape == (1, 1, 8, 8)
        assert set(g["reconstruction"][:].flat) <= {127, 128}  # Blank's mid-grey
    assert (tmp_path / f"{path.stem}-mydef.Blank-r1.png").exists()


def test_a_stored_users_class_is_read_without_its_module(tmp_path):
    """A results file of a plugin run stays readable where the module is not (analysis on
    another machine): only a run imports it."""
    from hpcfl.config import parse_stored

    cfg = parse_stored("privacy: {defense: gone:Halve}\n", "a file")
    assert cfg.privacy.defense == "gone:Halve"
    with pytest.raises(ConfigError, match="no module 'gone'"):
        load_config(None, ["privacy.defense=gone:Halve"])
