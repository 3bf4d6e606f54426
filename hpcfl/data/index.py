"""Which images each client holds: indices into the dataset's pools (docs/ARCHITECTURE.md,
"The round"). A client's data is never copied out of the pool but for the round it trains or
is evaluated in, so images that several clients share are stored once, and no per-client object
lives for the run.

- `SplitIndex`: the partitions that spread a split over all clients at once (iid, shards,
  dirichlet, noniid_s), computed at start-up for every client and held as two flat arrays with
  offsets.
- `SampledIndex`: data.partition=sampled (as pfl-research's artificial federated datasets): a
  client's images drawn from the pool by (seed, client) alone, when it is needed; a million
  clients cost nothing until they train or are evaluated.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..config import ConfigError, DataConfig
from ..streams import Stream, numpy_stream


class ClientIndex:
    """Every client's training and test indices into the train and test pools."""
    num_train: np.ndarray  # every client's training-set size (its aggregation weight)
    num_test: np.ndarray

    def train(self, cid: int) -> np.ndarray:
        raise NotImplementedError

    def test(self, cid: int) -> np.ndarray:
        raise NotImplementedError


def flat(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of any lengths as one array and the offsets of each."""
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return (np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)), offsets


class SplitIndex(ClientIndex):
    """Every client's (train, test) indices, from a partition of all clients."""

    def __init__(self, splits: list[tuple[np.ndarray, np.ndarray]]):
        self._train, self._train_at = flat([tr for tr, _ in splits])
        self._test, self._test_at = flat([te for _, te in splits])
        self.num_train = np.diff(self._train_at)
        self.num_test = np.diff(self._test_at)

    def train(self, cid: int) -> np.ndarray:
        return self._train[self._train_at[cid]:self._train_at[cid + 1]]

    def test(self, cid: int) -> np.ndarray:
        return self._test[self._test_at[cid]:self._test_at[cid + 1]]


def test_size(cfg: DataConfig, train: int) -> int:
    """A sampled client's test images: as many as data.test_fraction of its whole set."""
    return max(1, round(train * cfg.test_fraction / (1 - cfg.test_fraction)))


class SampledIndex(ClientIndex):
    """data.partition=sampled: client c's data.local_size training images (and its test images,
    `test_size`) drawn without replacement from the pool by the stream (seed, SAMPLED, c) alone:
    the same on every rank, computed only for the clients a rank trains or evaluates. With
    data.label_skew the client's label mix is first drawn from Dirichlet(data.dirichlet_alpha),
    else it is the pool's. Clients share images:
    the pool is sampled, not spread. Where the dataset has an official test split, test images
    come from it with the client's label mix."""

    def __init__(self, cfg: DataConfig, seed: int, labels: dict[str, np.ndarray],
                 allowed: np.ndarray | None, num_classes: int):
        self.k = cfg.local_size or 20
        self.t = test_size(cfg, self.k)
        self.seed, self.num_classes = seed, num_classes
        self.alpha = cfg.dirichlet_alpha if cfg.label_skew else None
        self.separate = "test" in labels  # an official test split
        train_ids = allowed if allowed is not None else np.arange(len(labels["train"]))
        self.pools = {"train": self._by_class(labels["train"], train_ids)}
        if self.separate:
            self.pools["test"] = self._by_class(labels["test"], np.arange(len(labels["test"])))
        need = self.k if self.separate else self.k + self.t
        if need > len(train_ids):
            raise ConfigError(f"data.local_size: {self.k} training and {self.t} test images per "
                              f"client are more than the {len(train_ids)} images to draw from")
        self.num_train = np.full(cfg.num_clients, self.k, dtype=np.int64)
        self.num_test = np.full(cfg.num_clients, self.t, dtype=np.int64)
        self._draw = lru_cache(maxsize=4096)(self._draw_uncached)

    def _by_class(self, labels: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
        return [ids[labels[ids] == c] for c in range(self.num_classes)]

    def _pick(self, g: np.random.Generator, pool: list[np.ndarray], mix: np.ndarray | None,
              n: int) -> np.ndarray:
        """n distinct images of the pool, following the label mix (None: the pool's own)."""
        if mix is None:
            everything = np.concatenate(pool)
            return np.sort(g.choice(everything, n, replace=False))
        counts = g.multinomial(n, mix)
        picked = [g.choice(members, m, replace=m > len(members))
                  for members, m in zip(pool, counts) if m]
        return np.sort(np.concatenate(picked))

    def _draw_uncached(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        g = numpy_stream(self.seed, Stream.SAMPLED, cid)
        mix = (g.dirichlet(np.full(self.num_classes, self.alpha)) if self.alpha is not None
               else None)
        if self.separate:
            return (self._pick(g, self.pools["train"], mix, self.k),
                    self._pick(g, self.pools["test"], mix, self.t))
        both = g.permutation(self._pick(g, self.pools["train"], mix, self.k + self.t))
        return np.sort(both[:self.k]), np.sort(both[self.k:])

    def train(self, cid: int) -> np.ndarray:
        return self._draw(cid)[0]

    def test(self, cid: int) -> np.ndarray:
        return self._draw(cid)[1]
