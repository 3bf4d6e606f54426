"""Models by name: the paper's CNNs split into extractor and head, and the hypernetwork."""
from __future__ import annotations

from ..config import ConfigError
from .cnn import CNNS, SplitModel
from .hypernet import HyperNetwork

AUTO = {(1, 8, 8): "digits_cnn", (1, 28, 28): "mnist_cnn", (3, 32, 32): "cifar_cnn"}


def resolve_name(name: str, shape: tuple[int, int, int]) -> str:
    if name == "auto":
        return AUTO[tuple(shape)]
    want = CNNS[name][2]
    if want is not None and tuple(shape) != want:
        fmt = "x".join
        raise ConfigError(f"model.name: {name} expects {fmt(map(str, want))} inputs, the dataset "
                          f"has {fmt(map(str, shape))}; use model.name=auto")
    return name


def build_model(name: str, shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """A freshly initialized model (uses torch's global RNG: seed it first)."""
    extractor, feature_dim, want = CNNS[resolve_name(name, shape)]
    if want is None:  # any input shape
        return SplitModel(extractor(shape[0]), feature_dim(shape), num_classes)
    return SplitModel(extractor(), feature_dim, num_classes)


__all__ = ["build_model", "resolve_name", "SplitModel", "HyperNetwork"]
