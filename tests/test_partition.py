import numpy as np
import pytest

from hpcfl.config import ConfigError, DataConfig
from hpcfl.data import load_federated, load_pool
from hpcfl.data.partition import partition, split_train_test

LABELS = load_pool(DataConfig())[1].numpy()  # the real digits labels


@pytest.mark.parametrize("name", ["iid", "shards", "dirichlet"])
@pytest.mark.parametrize("num_clients", [1, 7, 20, 100])
def test_partition_is_deterministic_disjoint_and_covers_every_sample(name, num_clients):
    k = 10 if num_clients == 1 else 3
    parts = partition(LABELS, name, num_clients, seed=3, classes_per_client=k, alpha=0.5)
    again = partition(LABELS, name, num_clients, seed=3, classes_per_client=k, alpha=0.5)
    assert len(parts) == num_clients
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)                       # disjoint ...
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))  # ... and covering
    other = partition(LABELS, name, num_clients, seed=4, classes_per_client=k, alpha=0.5)
    assert num_clients == 1 or any(not np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_shards_give_each_client_exactly_k_classes(k):
    parts = partition(LABELS, "shards", 20, seed=0, classes_per_client=k)
    assert [len(np.unique(LABELS[p])) for p in parts] == [k] * 20
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 0.25 * np.mean(sizes)  # roughly balanced


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_classes(alpha):
        parts = partition(LABELS, "dirichlet", 10, seed=0, alpha=alpha)
        return np.mean([len(np.unique(LABELS[p])) for p in parts])
    assert mean_classes(0.1) < mean_classes(100.0) == 10


def test_impossible_partitions_are_config_errors():
    with pytest.raises(ConfigError, match="leaves some of the 10 classes to no client"):
        partition(LABELS, "shards", 3, seed=0, classes_per_client=3)
    with pytest.raises(ConfigError, match="dirichlet_alpha"):
        partition(LABELS, "dirichlet", 800, seed=0, alpha=0.01)


def test_train_test_split_is_disjoint_inside_each_client():
    parts = partition(LABELS, "shards", 20, seed=0, classes_per_client=3)
    for (tr, te), p in zip(split_train_test(parts, 0.25, seed=0), parts):
        assert len(te) >= 1 and len(tr) >= 1
        assert np.array_equal(np.sort(np.concatenate([tr, te])), p)
        assert abs(len(te) - 0.25 * len(p)) <= 1


def test_hosted_clients_get_their_data_and_others_none():
    cfg = DataConfig(num_clients=10)
    full = load_federated(cfg, seed=1)
    some = load_federated(cfg, seed=1, hosted=lambda sizes: [2, 5])
    assert sorted(some.clients) == [2, 5] and some.num_train == full.num_train
    for cid in (2, 5):
        assert (some.clients[cid].x_train == full.clients[cid].x_train).all()
        assert (some.clients[cid].y_test == full.clients[cid].y_test).all()


def test_synthetic_data_has_the_papers_shapes_and_class_structure():
    for name, shape in [("synthetic-cifar10", (3, 32, 32)), ("synthetic-mnist", (1, 28, 28))]:
        x, y = load_pool(DataConfig(name=name, synthetic_samples=500))
        assert x.shape == (500, *shape) and set(y.tolist()) == set(range(10))
        # Learnable: samples are closer to their own class mean than to any other class mean.
        means = np.stack([x[y == c].mean(0).numpy().ravel() for c in range(10)])
        d = ((x.flatten(1).numpy()[:, None, :] - means[None]) ** 2).sum(-1)
        assert (d.argmin(1) == y.numpy()).mean() > 0.9
