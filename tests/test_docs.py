"""The documentation says what the code does: docs/configuration.md is the page
`python -m hpcfl.docs` generates from the config dataclasses, and docs/results-schema.md lists
every group, dataset and attribute that a run, an attack, a bench, the bench suite and the
dataset preparer write (tiny real runs, in this process)."""
from pathlib import Path

import h5py
import pytest

from hpcfl.attack import main as attack
from hpcfl.bench import main as bench
from hpcfl.bench_suite import main as suite
from hpcfl.data.prepare import main as prepare
from hpcfl.docs import COMMAND, configuration_page
from hpcfl.main import main as run

from . import datafiles
from .conftest import TINY
from .schema import assert_documented

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "jobs" / "quickstart.yaml")


def test_the_configuration_page_is_the_generated_one():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == configuration_page(), (
        f"docs/configuration.md differs from hpcfl/config.py; regenerate it: {COMMAND}")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """One file of every kind, each writer's attributes included: a DP run (with private
    heads, so its checkpoint has private rows) under a defense, attacked at round 2 and then
    finished (resumed); a run under the other defense that records attributes; a round-1
    attack; a bench of two cells; the suite (nothing fits its budget: its root, tests and
    skips); a prepared file."""
    out = tmp_path_factory.mktemp("written")
    common = [*TINY, f"output.dir={out}"]
    # batch 500 > every client's images: DP-SGD's sample rate is 1, calibrated at once
    dp = [QUICKSTART, *common, "algorithm.name=centaur", "train.batch_size=500",
          "privacy.defense=random_slice", "data.public_fraction=0.3", "attack.round=2",
          "attack.iterations=2", "output.name=dp"]
    assert attack(dp) == 0 and run(dp) == 0
    with h5py.File(out / "dp.ckpt.h5", "r") as f, h5py.File(out / "dp.h5", "r") as g:
        assert len(f["private"]) and len(f["private_ids"])  # /private/<name> is checked
        assert "resumed_from_round" in g.attrs and "privacy/ig" in g  # so are these
    assert run([*common, "algorithm.name=fedavg", "train.rounds=1",
                "privacy.defense=gradienthide", "data.public_fraction=0.02",
                "output.name=hide"]) == 0
    assert attack([*common, "algorithm.name=fedavg", "attack.iterations=2",
                   "output.name=round1"]) == 0
    assert bench(["--cells", "sequential:fp32:off,sequential:bf16:off", "--rounds", "1",
                  "--out", str(out / "bench.h5"), "algorithm.name=fedavg",
                  "data.num_clients=4", "train.local_epochs=1"]) == 0
    suite(["--budget", "10", "--out", str(out / "suite")])
    source = out / "source"
    datafiles.write_mnist_like(source, "mnist", per_class=(2, 1))
    assert prepare(["mnist", "--source", str(source), "--out", str(out / "mnist.h5")]) == 0
    return {"dp": out / "dp.h5", "hide": out / "hide.h5", "round1": out / "round1.h5",
            "dp-checkpoint": out / "dp.ckpt.h5", "hide-checkpoint": out / "hide.ckpt.h5",
            "bench": out / "bench.h5", "suite": out / "suite" / "suite.h5",
            "prepared": out / "mnist.h5"}


@pytest.mark.parametrize("name, kind", [
    ("dp", "results"), ("hide", "results"), ("round1", "results"),
    ("dp-checkpoint", "checkpoint"), ("hide-checkpoint", "checkpoint"),
    ("bench", "bench"), ("suite", "suite"), ("prepared", "prepared")])
def test_the_schema_page_lists_everything_a_file_holds(written, name, kind):
    assert_documented(written[name], kind)


def test_the_schema_check_names_what_is_missing(written, tmp_path):
    """An attribute and a dataset the page does not list are named in the failure."""
    import shutil

    path = tmp_path / "x.h5"
    shutil.copy(written["round1"], path)
    with h5py.File(path, "r+") as f:
        f["privacy/ig"].attrs["per_image_visible"] = 1
        f["privacy/ig/feature_error"] = [0.0]
    with pytest.raises(AssertionError) as e:
        assert_documented(path, "results")
    assert ("/privacy/<name>/feature_error; attribute per_image_visible of /privacy/<name>"
            in str(e.value))
