"""Datasets from their distributed files: `python -m hpcfl.data.prepare`, then runs on them."""
import hashlib
import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcfl.data.prepare import main as prepare
from hpcfl.main import main

from .conftest import TINY
from .datafiles import CIFAR_CLASSES, write_cifar10, write_dataset, write_idx, write_mnist_like

NAMES = ["mnist", "fmnist", "emnist", "cifar10", "cinic10"]


@pytest.mark.parametrize("name", NAMES)
def test_prepare_keeps_every_image_and_label_and_a_run_trains_on_it(name, tmp_path, capsys):
    src = tmp_path / "src"
    written = write_dataset(src, name)
    out = tmp_path / "data" / f"{name}.h5"
    assert prepare([name, "--source", str(src), "--out", str(out)]) == 0
    with h5py.File(out) as f:
        for split in ("train", "test"):
            x, y = written[split]
            assert np.array_equal(f[f"{split}/images"][:], x)
            assert np.array_equal(f[f"{split}/labels"][:], y)
        classes = json.loads(f.attrs["classes"])
        sources = json.loads(f.attrs["sources"])
        assert f.attrs["command"].startswith(f"python -m hpcfl.data.prepare {name} --source")
    assert len(classes) == (62 if name == "emnist" else 10)
    if name in ("cifar10", "cinic10"):
        assert classes == CIFAR_CLASSES
    if name == "cifar10":
        batch = src / "cifar-10-batches-py" / "data_batch_3"
        assert sources["cifar-10-batches-py/data_batch_3"] == \
            hashlib.sha256(batch.read_bytes()).hexdigest()
    assert not list(out.parent.glob(".*tmp*"))

    runs = tmp_path / "runs"
    assert main([*TINY, f"data.name={name}", f"data.root={out.parent}", "data.partition=noniid_s",
                 "data.local_size=20", "data.num_clients=4", "train.local_epochs=1",
                 f"output.dir={runs}", "output.name=r"]) == 0
    with h5py.File(runs / "r.h5") as f:
        assert f.attrs["status"] == "completed" and len(f["metrics/round"]) == 2
        train, test = f["clients/num_samples"][:], f["clients/num_test_samples"][:]
        if name in ("mnist", "fmnist"):  # classes large enough for the official sizes
            assert (train == 20).all() and (test == 20).all()
        else:  # tiny classes: the official slicing takes what there is
            assert (train > 0).all() and (train <= 20).all() and (test > 0).all()
        assert np.isfinite(f["metrics/train_loss"][:]).all()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("damage", ["truncated", "foreign", "missing"])
def test_a_damaged_source_file_gives_one_line_and_exit_2(damage, tmp_path, capsys):
    write_mnist_like(tmp_path, "mnist", gz=False)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "foreign":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    else:
        path.unlink()
    out = tmp_path / "mnist.h5"
    assert prepare(["mnist", "--source", str(tmp_path), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "train-images-idx3-ubyte" in err
    assert {"truncated": "truncated", "foreign": "not an idx file", "missing": "not found"}[
        damage] in err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_a_truncated_gzip_gives_one_line_and_exit_2(tmp_path, capsys):
    write_mnist_like(tmp_path, "fmnist", gz=True)
    path = tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    assert prepare(["fmnist", "--source", str(tmp_path), "--out", str(tmp_path / "f.h5")]) == 2
    assert "t10k-labels-idx1-ubyte.gz" in one_error_line(capsys)


class Payload:
    """Unpickling this runs a shell command (what a hostile 'CIFAR batch' would do)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["data_batch_2", "batches.meta"])
def test_a_pickle_carrying_code_is_refused_and_runs_nothing(where, tmp_path, capsys):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / where, "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [Payload(marker)],
                     "label_names": [Payload(marker)]}, f, protocol=2)
    assert prepare(["cifar10", "--source", str(tmp_path), "--out", str(tmp_path / "c.h5")]) == 2
    err = one_error_line(capsys)
    assert "refused" in err and "system" in err and where in err
    assert not marker.exists() and not (tmp_path / "c.h5").exists()


def test_a_cinic_image_of_the_wrong_size_is_named(tmp_path, capsys):
    from PIL import Image

    write_dataset(tmp_path, "cinic10")
    bad = tmp_path / "CINIC-10" / "test" / "cat" / "n99999.png"
    Image.new("RGB", (28, 28)).save(bad)
    assert prepare(["cinic10", "--source", str(tmp_path), "--out", str(tmp_path / "c.h5")]) == 2
    assert "n99999.png" in one_error_line(capsys)


@pytest.mark.parametrize("problem", ["missing", "truncated", "other dataset"])
def test_a_run_on_a_missing_or_damaged_file_names_the_prepare_command(problem, tmp_path, capsys):
    root = tmp_path / "data"
    if problem != "missing":
        write_mnist_like(tmp_path / "src", "fmnist")
        assert prepare(["fmnist", "--source", str(tmp_path / "src"), "--out",
                        str(root / "fmnist.h5")]) == 0
        if problem == "truncated":
            data = (root / "fmnist.h5").read_bytes()
            (root / "fmnist.h5").write_bytes(data[:len(data) // 2])
        else:
            (root / "fmnist.h5").rename(root / "mnist.h5")
    capsys.readouterr()
    name = "mnist" if problem == "other dataset" else "fmnist"
    runs = tmp_path / "runs"
    assert main([*TINY, f"data.name={name}", f"data.root={root}", f"output.dir={runs}"]) == 2
    err = one_error_line(capsys)
    assert f"python -m hpcfl.data.prepare {name} --source DIR" in err
    assert not runs.exists()


def test_idx_writer_matches_the_format_torchvision_reads(tmp_path):
    """Our test files are real idx files: torchvision's own reader parses them."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    assert np.array_equal(read_image_file(str(write_idx(tmp_path / "i", x, False))).numpy(), x)
    y = np.array([3, 7], np.uint8)
    assert read_label_file(str(write_idx(tmp_path / "l", y, False))).tolist() == [3, 7]


def test_cifar_writer_matches_the_format_torchvision_reads(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    written = write_cifar10(tmp_path)
    # The tiny files are not the real ones: check presence instead of the real md5s.
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", None]])
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", None] for i in range(1, 6)])
    monkeypatch.setitem(CIFAR10.meta, "md5", None)
    ds = CIFAR10(str(tmp_path), train=False, download=False)
    assert np.array_equal(ds.data.transpose(0, 3, 1, 2), written["test"][0])
    assert ds.classes == CIFAR_CLASSES


PAPER_JOBS = sorted((Path(__file__).parent.parent / "jobs" / "paper").glob("*-*c-*.yaml"))


def test_paper_jobs_cover_the_cnn_table_with_the_official_settings():
    from hpcfl.config import load_config

    cells = set()
    for path in PAPER_JOBS:
        cfg = load_config(str(path))
        assert cfg.data.partition == "noniid_s" and cfg.data.root == "data"
        assert (cfg.train.rounds, cfg.train.local_epochs, cfg.train.batch_size, cfg.train.lr) == \
            (200, 5, 50, 0.02)
        assert cfg.output.name == f"paper-{path.stem}"
        cells.add((cfg.data.name, cfg.data.num_clients, cfg.algorithm.name))
    assert cells == {(d, n, m) for d in ("emnist", "fmnist", "cifar10", "cinic10")
                     for n in (20, 100)
                     for m in ("hyperfl", "local", "fedavg", "dpfedavg", "ppsgd", "centaur")}


def test_a_paper_job_completes_on_a_tiny_prepared_file(tmp_path):
    write_mnist_like(tmp_path / "src", "fmnist")
    assert prepare(["fmnist", "--source", str(tmp_path / "src"), "--out",
                    str(tmp_path / "data" / "fmnist.h5")]) == 0
    job = Path(__file__).parent.parent / "jobs" / "paper" / "fmnist-20c-centaur.yaml"
    assert main([str(job), f"data.root={tmp_path / 'data'}", "train.rounds=1",
                 f"output.dir={tmp_path / 'runs'}", "output.progress=none"]) == 0
    with h5py.File(tmp_path / "runs" / "paper-fmnist-20c-centaur.h5") as f:
        assert f.attrs["status"] == "completed" and len(f["clients/num_samples"]) == 20
        assert 0 < f["metrics/epsilon"][-1] <= 4.0


def test_pixels_become_the_official_transform_of_each_image(tmp_path):
    """uint8 -> crop (black padding 4) -> flip -> [0, 1] -> Normalize(official mean, std), as
    torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize."""
    import torch
    import torchvision.transforms.functional as TF
    from PIL import Image

    from hpcfl.config import load_config
    from hpcfl.data import load_federated
    from hpcfl.data.transforms import model_inputs

    write_cifar10(tmp_path / "src")
    assert prepare(["cifar10", "--source", str(tmp_path / "src"), "--out",
                    str(tmp_path / "cifar10.h5")]) == 0
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path}", "data.num_clients=2",
                             "data.partition=noniid_s", "data.local_size=10"])
    client = load_federated(cfg.data, 0).clients[0]
    x = client.x_train[:3]
    assert x.dtype == torch.uint8
    draws = torch.tensor([[0, 8, 1], [4, 4, 0], [7, 2, 1]])
    mine = model_inputs(client, x, draws)
    for img, (dy, dx, flip), got in zip(x, draws.tolist(), mine):
        pil = TF.crop(TF.pad(Image.fromarray(img.numpy().transpose(1, 2, 0)), 4, fill=0),
                      dy, dx, 32, 32)
        pil = TF.hflip(pil) if flip else pil
        want = TF.normalize(TF.to_tensor(pil), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
        assert (got - want).abs().max() <= 1e-5
    test = model_inputs(client, client.x_test[:2])  # evaluation: ToTensor + Normalize only
    want = TF.normalize(client.x_test[:2].float() / 255, (0.4914, 0.4822, 0.4465),
                        (0.2023, 0.1994, 0.2010))
    assert (test - want).abs().max() <= 1e-6


def test_uint8_pixels_with_augmentation_train_the_same_on_both_engine_paths(tmp_path):
    """Both paths feed the model the same batches, bit for bit: each client's batch order and
    crop/flip draws (the vectorized schedule pads the sequential one) and the uint8 pixels made
    into normalized floats. Their updates then agree within 5e-4: on an AVX2 machine the
    vectorized path's grouped-convolution weight gradient is 0.5 % off the float64 one on
    black-padded crops (a sum that cancels), where the sequential path's oneDNN convolution is
    within 1e-6 (measured; docs/performance.md, "Engine modes")."""
    import torch

    from hpcfl.algorithms import build_algorithm
    from hpcfl.config import load_config
    from hpcfl.data import load_federated
    from hpcfl.data.transforms import crop_flip_draws, model_inputs
    from hpcfl.engine import RoundSpec, minibatches, train_cohort
    from hpcfl.engine.stacked import schedules
    from hpcfl.streams import Stream, torch_stream

    write_cifar10(tmp_path / "src")
    assert prepare(["cifar10", "--source", str(tmp_path / "src"), "--out",
                    str(tmp_path / "cifar10.h5")]) == 0
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path}", "data.num_clients=3",
                             "data.partition=dirichlet", "algorithm.name=fedavg",
                             "train.local_epochs=1"])
    data = load_federated(cfg.data, 0)
    assert data.augment  # auto: the official CIFAR-10 transform
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    cids, shared = [0, 1, 2], algo.init_shared()
    w = [float(data.num_train[c]) for c in cids]
    spec = RoundSpec(1, 0, 10, True, "vectorized", 0, tuple(cids), tuple(w))
    phase = algo.phases()[0]
    idx, weight, active, draws = schedules(data.clients, cids, spec, phase, 0, "cpu")
    for i, c in enumerate(cids):
        client = data.clients[c]
        aug = torch_stream(0, Stream.AUGMENT, 1, c, 0)
        steps = minibatches(client.num_train, 10, phase, torch_stream(0, Stream.BATCH_ORDER,
                                                                      1, c, 0))
        for s, b in enumerate(steps):
            n = len(b)
            assert torch.equal(idx[i, s, :n], b) and weight[i, s, n:].sum() == 0
            d = crop_flip_draws(aug, n)
            assert torch.equal(draws[i, s, :n], d)
            assert torch.equal(model_inputs(client, client.x_train[b], d),
                               model_inputs(client, client.x_train[idx[i, s, :n]],
                                            draws[i, s, :n]))
        assert active[i].sum() == s + 1
    seq, vec = (train_cohort(algo, RoundSpec(1, 0, 10, True, mode, 0, tuple(cids), tuple(w)),
                             shared, {c: {} for c in cids}, data.clients, "cpu").data
                for mode in ("sequential", "vectorized"))
    assert (seq[:-4] / seq[-1] - vec[:-4] / vec[-1]).abs().max() <= 5e-4
