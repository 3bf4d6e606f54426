import hashlib

import numpy as np
import pytest
import torch

from hpcfl.config import ConfigError, DataConfig
from hpcfl.data import load_federated, load_pool
from hpcfl.data.partition import hold_out, partition, split_train_test

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


def test_a_clients_data_is_its_indices_into_the_pool():
    """No client holds a copy: its samples are gathered from the one pool by its indices."""
    cfg = DataConfig(num_clients=10)
    data = load_federated(cfg, seed=1)
    assert len(data.clients) == 10 and data.num_train.sum() + data.num_test.sum() == 1797
    for cid in (2, 5):
        tr, te = data.index.train(cid), data.index.test(cid)
        assert len(np.intersect1d(tr, te)) == 0
        c = data.clients[cid]
        assert torch.equal(c.x_train, data.train_pool.x[tr])
        assert torch.equal(c.y_test, data.test_pool.y[te])


def test_the_digits_are_scikit_learns():
    """Read from scikit-learn's file without importing it: its load_digits' images and labels."""
    from sklearn.datasets import load_digits as sk_digits

    from hpcfl.data.builtin import load_digits
    x, y = load_digits()
    want = sk_digits()
    assert x.dtype == torch.float32 and x.shape == (1797, 1, 8, 8)
    assert np.array_equal(x.squeeze(1).numpy(), want.images.astype(np.float32) / 16)
    assert np.array_equal(y.numpy(), want.target) and y.dtype == torch.int64


def test_synthetic_data_has_the_papers_shapes_and_class_structure():
    for name, shape in [("synthetic-cifar10", (3, 32, 32)), ("synthetic-mnist", (1, 28, 28))]:
        x, y, _, _ = load_pool(DataConfig(name=name, synthetic_samples=500))
        assert x.shape == (500, *shape) and set(y.tolist()) == set(range(10))
        x = x.float()  # uint8 pixels
        # Learnable: samples are closer to their own class mean than to any other class mean.
        means = np.stack([x[y == c].mean(0).numpy().ravel() for c in range(10)])
        d = ((x.flatten(1).numpy()[:, None, :] - means[None]) ** 2).sum(-1)
        assert (d.argmin(1) == y.numpy()).mean() > 0.9


# ---------------------------------------------------------------- the official noniid_s split

def official_counts(dataset: str, client: int, size: int) -> list[int]:
    """Label counts of one client under the official rules (FedPAC's data_loader.py, as HyperFL's
    cnn/data_loader.py copies it): int(size * 0.2) images spread evenly over all classes (the
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


# Every client's (train, test) indices as sha256(concat(train, test) as int64)[:12], recorded on
# main before the data became indices into pools (digits, seed 0, 20 clients unless named): the
# partitions of published runs must not move.
PINNED = {
    ("digits", "iid", 0.0, 20): {0: "b173c62620fa", 7: "2fc7d7f72cfd", 19: "cd9d182a4cb0"},
    ("digits", "shards", 0.0, 20): {0: "2c893fc4b0f0", 7: "97da20b61ff0", 19: "182acb24ac52"},
    ("digits", "dirichlet", 0.0, 20): {0: "2978d2dfcb7e", 7: "f417cc75cfd4", 19: "3851832464ec"},
    ("digits", "iid", 0.1, 20): {0: "4313c7015ccc", 7: "6381cf5d5675", 19: "eada2ffb602d"},
    ("synthetic-mnist", "dirichlet", 0.0, 50): {0: "3daddab15c22", 7: "4cdf8636c374",
                                                49: "5dafce9fc92b"},
}


def fingerprint(data, cid: int) -> str:
    both = np.concatenate([data.index.train(cid), data.index.test(cid)]).astype(np.int64)
    return hashlib.sha256(both.tobytes()).hexdigest()[:12]


@pytest.mark.parametrize("key", list(PINNED))
def test_partitions_are_the_ones_recorded_before_indices(key):
    name, part, public, n = key
    data = load_federated(DataConfig(name=name, partition=part, public_fraction=public,
                                     num_clients=n), seed=0)
    assert {c: fingerprint(data, c) for c in PINNED[key]} == PINNED[key]
    if key == ("digits", "iid", 0.0, 20):
        assert data.index.train(0)[:6].tolist() == [50, 91, 107, 149, 191, 204]
        assert data.index.test(0)[:4].tolist() == [22, 85, 174, 238]
        assert (len(data.index.train(0)), len(data.index.test(0))) == (68, 22)


def test_dirichlet_past_ten_thousand_clients_is_refused_with_what_to_use():
    with pytest.raises(ConfigError, match="partition=sampled with data.label_skew=true"):
        partition(np.arange(100_000) % 10, "dirichlet", 20_000, seed=0)


def sampled(num_clients: int, **kw):
    return load_federated(DataConfig(partition="sampled", num_clients=num_clients, **kw), seed=2)


def test_a_sampled_client_is_drawn_from_the_seed_and_its_id_alone():
    small, large = sampled(30), sampled(1_000_000)
    assert large.index._draw.cache_info().currsize == 0  # nothing computed at start-up
    assert len(large.num_train) == 1_000_000 and set(large.num_train.tolist()) == {20}
    for cid in (0, 17, 29):
        assert np.array_equal(small.index.train(cid), large.index.train(cid))
        assert np.array_equal(small.index.test(cid), large.index.test(cid))
    assert large.index._draw.cache_info().currsize == 3
    tr, te = large.index.train(999_999), large.index.test(999_999)
    f = DataConfig().test_fraction  # the test share of a client's whole set
    assert len(tr) == 20 and len(te) == round(20 * f / (1 - f)) == large.num_test[999_999]
    assert len(np.intersect1d(tr, te)) == 0
    assert not np.array_equal(large.index.train(0), large.index.train(1))
    other_seed = load_federated(DataConfig(partition="sampled", num_clients=30), seed=3)
    assert not np.array_equal(other_seed.index.train(0), small.index.train(0))
    c = large.client(999_999)
    assert torch.equal(c.x_train, large.train_pool.x[tr])


def test_sampled_label_skew_follows_dirichlet_alpha():
    def classes(alpha):
        d = sampled(200, local_size=40, label_skew=True, dirichlet_alpha=alpha)
        return np.mean([len(np.unique(LABELS[d.index.train(c)])) for c in range(200)])
    plain = sampled(200, local_size=40)
    unskewed = np.mean([len(np.unique(LABELS[plain.index.train(c)])) for c in range(200)])
    assert classes(0.1) < classes(10.0) <= unskewed + 0.5
    assert classes(0.1) < 4 and unskewed > 8


def test_sampled_clients_never_draw_held_out_public_images():
    d = sampled(50, public_fraction=0.2)
    public = set(hold_out(len(LABELS), 0.2, 2)[0].tolist())
    drawn = np.concatenate([np.concatenate([d.index.train(c), d.index.test(c)])
                            for c in range(50)])
    assert not public & set(drawn.tolist())


def test_sampled_refuses_more_images_than_the_pool():
    with pytest.raises(ConfigError, match="data.local_size"):
        sampled(5, local_size=2000)
