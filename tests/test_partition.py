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
        x, y, _, _ = load_pool(DataConfig(name=name, synthetic_samples=500))
        assert x.shape == (500, *shape) and set(y.tolist()) == set(range(10))
        # Learnable: samples are closer to their own class mean than to any other class mean.
        means = np.stack([x[y == c].mean(0).numpy().ravel() for c in range(10)])
        d = ((x.flatten(1).numpy()[:, None, :] - means[None]) ** 2).sum(-1)
        assert (d.argmin(1) == y.numpy()).mean() > 0.9


# ---------------------------------------------------------------- the official noniid_s split

def official_counts(dataset: str, client: int, size: int) -> list[int]:
    """Label counts of one client under the official rules (FedPAC's data_loader.py, digest in
    shared/research/hyperfl.md §2): int(size * 0.2) images spread evenly over all classes (the
    last class takes the remainder), the rest evenly over the client's label group (its last
    class takes the remainder)."""
    num_classes = 62 if dataset == "emnist" else 10
    groups = ([list(range(10)), list(range(10, 36)), list(range(36, 62))] if dataset == "emnist"
              else [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8], [8, 9, 0]])
    counts = [0] * num_classes
    n_iid = int(size * 0.2)
    for y in range(num_classes):
        counts[y] += n_iid // num_classes
    counts[-1] += n_iid - num_classes * (n_iid // num_classes)
    group = groups[client % len(groups)]
    for y in group:
        counts[y] += (size - n_iid) // len(group)
    counts[group[-1]] += (size - n_iid) - len(group) * ((size - n_iid) // len(group))
    return counts


def noniid_split(dataset, labels, num_clients, seed=0, test=False):
    from hpcfl.data.files import FILE_DATASETS
    from hpcfl.data.partition import noniid_s

    spec = FILE_DATASETS[dataset]
    r = spec.rules
    size = (r.test_size or spec.local_size) if test else spec.local_size
    return noniid_s(labels, spec.num_classes, num_clients, size, 20, r, int(test), seed)


@pytest.mark.parametrize("num_clients", [20, 100])
@pytest.mark.parametrize("dataset, test", [("fmnist", False), ("fmnist", True),
                                           ("cifar10", False), ("cifar10", True),
                                           ("emnist", False), ("emnist", True)])
def test_noniid_s_gives_the_official_sizes_and_label_mix(dataset, test, num_clients):
    num_classes = 62 if dataset == "emnist" else 10
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(num_classes), 200))
    parts = noniid_split(dataset, labels, num_clients, test=test)
    size = {"fmnist": 600, "cifar10": 300 if test else 600, "emnist": 600 if test else 1000}
    assert len(parts) == num_clients
    for i, p in enumerate(parts):
        assert len(p) == size[dataset]
        assert np.bincount(labels[p], minlength=num_classes).tolist() == \
            official_counts(dataset, i, size[dataset])
    # the same seed gives the same split; another seed other images, same sizes and labels
    again, other = (noniid_split(dataset, labels, num_clients, seed=s, test=test) for s in (0, 1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))
    assert [np.bincount(labels[p], minlength=num_classes).tolist() for p in other] == \
        [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]


def test_noniid_s_known_clients():
    """Literal facts of the official split: CIFAR client 0 holds 172 images of classes 0-2 and 12
    of each other class (test: 86 / 6); EMNIST client 1 (upper-case group) holds 3 of each class,
    33 of upper-case letters, 53 of 'Z', and 17 of 'z' (the remainder of the iid part)."""
    labels = np.repeat(np.arange(10), 300)
    cifar = np.bincount(labels[noniid_split("cifar10", labels, 20)[0]], minlength=10)
    assert cifar.tolist() == [172] * 3 + [12] * 7
    cifar_test = np.bincount(labels[noniid_split("cifar10", labels, 20, test=True)[0]])
    assert cifar_test.tolist() == [86] * 3 + [6] * 7
    labels = np.repeat(np.arange(62), 300)
    emnist = np.bincount(labels[noniid_split("emnist", labels, 20)[1]], minlength=62)
    assert emnist.tolist() == [3] * 10 + [33] * 25 + [53] + [3] * 25 + [17]


def test_noniid_s_reuses_images_only_where_the_official_code_does():
    """Classes large enough never to wrap: the CIFAR rules give disjoint clients; the EMNIST
    rules overlap only in the last class of each letter group (emnist_noniid_s advances the
    cursor by the per-class share, 30, after taking 50)."""
    for dataset, num_classes in (("cifar10", 10), ("emnist", 62)):
        labels = np.repeat(np.arange(num_classes), 20000)
        parts = noniid_split(dataset, labels, 20)
        seen, reused = set(), set()
        for p in parts:
            reused |= seen & set(p.tolist())
            seen |= set(p.tolist())
        assert set(labels[list(reused)].tolist()) == (set() if dataset == "cifar10" else {35, 61})


def test_noniid_s_needs_an_official_test_split():
    from hpcfl.config import load_config

    cfg = load_config(None, ["data.partition=noniid_s"])
    with pytest.raises(ConfigError, match="official test split"):
        load_federated(cfg.data, 0)
