"""Spread a dataset's samples over clients, then split each client's samples into train and test.

Every function depends on its arguments and the seed only, never on ranks: each rank computes
the same partition. The parts are disjoint and together cover every sample.
"""
from __future__ import annotations

import numpy as np

from ..config import ConfigError
from ..streams import Stream, numpy_stream
from .files import NoniidRules




def hold_out(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(public, private) sorted indices: a seeded `fraction` of the samples that no client
    holds (an attacker's or a defense's public data), and the rest."""
    perm = numpy_stream(seed, Stream.PUBLIC).permutation(num_samples)
    k = int(round(fraction * num_samples))
    return np.sort(perm[:k]), np.sort(perm[k:])


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    perm = numpy_stream(seed, Stream.PARTITION).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int,
           seed: int) -> list[np.ndarray]:
    """Each client holds exactly `classes_per_client` classes; each class is split evenly among
    the clients that hold it (classes are dealt round-robin over a seeded class order, so every
    class has the same number of holders, give or take one)."""
    num_classes = int(labels.max()) + 1
    if classes_per_client > num_classes:
        raise ConfigError(f"data.classes_per_client: {classes_per_client} is more than the "
                          f"{num_classes} classes of the dataset")
    if num_clients * classes_per_client < num_classes:
        raise ConfigError(f"data.classes_per_client: num_clients * classes_per_client = "
                          f"{num_clients * classes_per_client} leaves some of the {num_classes} "
                          "classes to no client; raise either")
    g = numpy_stream(seed, Stream.PARTITION)
    order = g.permutation(num_classes)
    deal = np.resize(order, num_clients * classes_per_client).reshape(num_clients, -1)
    holders = {c: np.nonzero((deal == c).any(axis=1))[0] for c in range(num_classes)}
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = g.permutation(np.nonzero(labels == c)[0])
        for client, chunk in zip(holders[c], np.array_split(idx, len(holders[c]))):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


DIRICHLET_MAX_CLIENTS = 10_000


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_size: int = 2, max_tries: int = 1000) -> list[np.ndarray]:
    """Per class, proportions over clients ~ Dirichlet(alpha) (Hsu et al. 2019); redrawn until
    every client has at least `min_size` samples."""
    num_classes = int(labels.max()) + 1
    g = numpy_stream(seed, Stream.PARTITION)
    by_class = [g.permutation(np.nonzero(labels == c)[0]) for c in range(num_classes)]
    for _ in range(max_tries):
        cuts = [(np.cumsum(g.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)).astype(int)
                for idx in by_class]
        # sizes from the cuts alone: a draw that fails costs no splitting
        sizes = sum(np.diff(c, prepend=0, append=len(idx)) for idx, c in zip(by_class, cuts))
        if sizes.min() >= min_size:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for idx, c in zip(by_class, cuts):
                for client, chunk in enumerate(np.split(idx, c)):
                    parts[client].append(chunk)
            return [np.sort(np.concatenate(p)) for p in parts]
    raise ConfigError(f"data.dirichlet_alpha: {alpha} leaves some client with fewer than "
                      f"{min_size} samples; use a larger alpha or fewer clients")


def partition(labels: np.ndarray, name: str, num_clients: int, seed: int, *,
              classes_per_client: int = 2, alpha: float = 0.5) -> list[np.ndarray]:
    if num_clients * 2 > len(labels):
        raise ConfigError(f"data.num_clients: {num_clients} clients need at least "
                          f"{2 * num_clients} samples (one train, one test each); the dataset "
                          f"has {len(labels)}")
    if name == "iid":
        return iid(labels, num_clients, seed)
    if name == "shards":
        return shards(labels, num_clients, classes_per_client, seed)
    if name == "dirichlet":
        if num_clients > DIRICHLET_MAX_CLIENTS:
            raise ConfigError(f"data.partition=dirichlet: {num_clients} clients is past "
                              f"{DIRICHLET_MAX_CLIENTS:,} (its redraws until every client holds "
                              "two samples do not end there); use data.partition=sampled with "
                              "data.label_skew=true, the same Dirichlet label skew per client")
        return dirichlet(labels, num_clients, alpha, seed)
    raise ConfigError(f"data.partition: unknown partition {name!r}")


def split_train_test(parts: list[np.ndarray], test_fraction: float,
                     seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client's own test split, drawn from its own samples (same label mix as its train
    split in expectation); at least one sample on each side."""
    out = []
    for cid, idx in enumerate(parts):
        if len(idx) < 2:
            raise ConfigError(f"data: client {cid} has {len(idx)} sample(s), too few to split "
                              "into train and test; use fewer clients")
        perm = numpy_stream(seed, Stream.SPLIT, cid).permutation(idx)
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        out.append((np.sort(perm[n_test:]), np.sort(perm[:n_test])))
    return out


def noniid_s(labels: np.ndarray, num_classes: int, num_clients: int, size: int,
             iid_percent: float, rules: NoniidRules, split: int, seed: int) -> list[np.ndarray]:
    """The official "noniid_s" split (FedPAC's data_loader.py, `*_noniid_s`) of the train
    (`split` 0) or test (1) labels: client i gets int(size * iid_percent / 100) images spread
    evenly over all classes (the last class takes the remainder), and the rest spread evenly
    over its group of classes, rules.class_groups[i % len(rules.class_groups)] (its last class
    takes the remainder). Each class is consumed in order from a cursor that starts at the
    split's rules cursor and wraps to the class start when a request would run past its end, so
    with many clients images are reused, as officially.

    The official code walks each class in the order of an unstable argsort (implementation-
    defined); here each class's order is a permutation drawn from (seed, split, class), so the
    split depends on the seed only. Class starts and sizes are the real ones (the official
    mnist/cifar variants assume equal class sizes, which holds for FMNIST, CIFAR-10, CINIC-10).
    """
    order = [numpy_stream(seed, Stream.PARTITION, split, c).permutation(np.nonzero(labels == c)[0])
             for c in range(num_classes)]
    used = [rules.test_cursor if split else rules.train_cursor] * num_classes

    def take(y: int, num: int, advance: int) -> np.ndarray:
        if used[y] + num > len(order[y]):
            used[y] = 0
        out = order[y][used[y]:used[y] + num]
        used[y] += advance
        return out

    n_iid = int(size * (iid_percent / 100))  # the official float expression, e.g. 600 * 0.2
    n_rest = size - n_iid
    iid_each = n_iid // num_classes
    iid_sizes = [iid_each] * (num_classes - 1) + [n_iid - iid_each * (num_classes - 1)]
    parts = []
    for i in range(num_clients):
        chunks = [take(y, n, n) for y, n in enumerate(iid_sizes)]
        group = rules.class_groups[i % len(rules.class_groups)]
        share = n_rest // len(group)
        for j, y in enumerate(group):
            n = share if j < len(group) - 1 else n_rest - share * (len(group) - 1)
            chunks.append(take(y, n, share if rules.advance_by_share else n))
        parts.append(np.concatenate(chunks))
    return parts
