import h5py
import numpy as np
import pytest
import torch

from hpcfl.algorithms import build_algorithm
from hpcfl.data import load_federated
from hpcfl.engine import RoundSpec, Slot, train_client, train_cohort, unflatten
from hpcfl.loop import run
from hpcfl.world import World

from .conftest import evaluate_each


@pytest.mark.parametrize("name, engine", [("hyperfl", "sequential"), ("fedavg", "sequential"),
                                          ("local", "sequential"), ("hyperfl", "vectorized")])
def test_each_algorithm_reduces_its_loss_and_learns(name, engine, tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"algorithm.name={name}", "train.rounds=10", "train.local_epochs=2",
                   f"engine.mode={engine}", "engine.stack_size=4",
                   f"output.dir={tmp_path}", "output.name=r")
    data = load_federated(cfg.data, cfg.train.seed)
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    shared = algo.init_shared()
    before = evaluate_each(algo, shared, {c: algo.init_client(c) for c in data.clients}, data)
    final = run(cfg, World("cpu"))
    with h5py.File(final["path"]) as f:
        train_loss = f["metrics/train_loss"][:]
        loss_after = f["metrics/test_loss_mean"][-1]
        acc_after = f["metrics/test_acc_mean"][-1]
    assert train_loss[-1] < train_loss[0]
    assert loss_after < np.mean(before[:, 1] / before[:, 2])
    assert acc_after > 0.6  # chance is 1/3 on a client's 3 classes


def test_hyperfl_uploads_only_the_hypernetwork(tiny_cfg):
    cfg = tiny_cfg()
    data = load_federated(cfg.data, cfg.train.seed)
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    shared = algo.init_shared()
    hyper_names = {"hypernet." + k for k, _ in algo.hypernet.named_parameters()}
    assert set(shared) == hyper_names
    private = {c: algo.init_client(c) for c in (0, 1)}
    assert set(private[0]) == {"embedding", "head.weight", "head.bias"}
    before = {c: {k: v.clone() for k, v in p.items()} for c, p in private.items()}
    shared_before = {k: v.clone() for k, v in shared.items()}

    trained, _ = train_client(algo, {**shared, **private[0]}, data.clients[0], RoundSpec(1, 0, 50),
                              0)
    assert set(algo.upload(shared, trained)) == hyper_names  # nothing private in the upload

    w = [float(data.num_train[c]) for c in (0, 1)]
    buf = train_cohort(algo, RoundSpec(1, 0, 50, cohort=(0, 1), weights=tuple(w)), shared, private,
                       data.clients, "cpu").data
    numel = sum(v.numel() for v in shared.values())
    assert buf.numel() == numel + len(Slot) and buf[-1] == sum(w)
    for k in shared:  # the shared state moves only in the server step
        assert torch.equal(shared[k], shared_before[k])
    for c in (0, 1):  # private state moved, and stays in the client's own dict
        assert not torch.equal(private[c]["embedding"], before[c]["embedding"])
        assert not torch.equal(private[c]["head.weight"], before[c]["head.weight"])


def test_server_step_is_the_sample_weighted_average_of_client_models(tiny_cfg):
    cfg = tiny_cfg()
    data = load_federated(cfg.data, cfg.train.seed)
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    shared = algo.init_shared()
    cohort, w = [0, 3, 4], [float(data.num_train[c]) for c in (0, 3, 4)]
    models = [train_client(algo, {**shared, **algo.init_client(c)}, data.clients[c],
                           RoundSpec(1, 0, 50), c)[0] for c in cohort]
    buf = train_cohort(algo, RoundSpec(1, 0, 50, cohort=tuple(cohort), weights=tuple(w)), shared,
                       {c: algo.init_client(c) for c in cohort}, data.clients, "cpu").data
    algo.server_step(shared, unflatten(buf[:-len(Slot)], shared), float(buf[-1]))
    for k in shared:  # official average_weights_weighted
        expect = sum(wi * m[k] for wi, m in zip(w, models)) / sum(w)
        assert torch.allclose(shared[k], expect, atol=1e-5), k
