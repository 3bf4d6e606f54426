"""The CNNs of the HyperFL paper (official code: cnn/models/cnn.py, from FedPAC), each split into a
feature extractor and a classifier head, plus a small variant for 8x8 digits.

The official code applies the activation, then max-pools; here max-pooling comes first. Both
(leaky) ReLUs are monotone, so the values and gradients are the same (up to which of two tied
inputs receives the gradient), and the activation then runs on a quarter of the elements."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitModel(nn.Module):
    """`extractor` maps an image to a feature vector; `head` maps it to class logits.

    HyperFL generates the extractor's weights and keeps the head private, so every model here
    names its parameters `extractor.*` and `head.*`.
    """

    def __init__(self, extractor: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.extractor = extractor
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(x))


class CifarExtractor(nn.Module):
    """conv5x5(3->16) pool conv5x5(16->32, pad 1) pool conv3x3(32->64, pad 1) pool fc(576->128);
    leaky ReLU after every layer (official CifarCNN for CIFAR-10 and CINIC-10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(576, 128)

    def forward(self, x):
        x = F.leaky_relu(F.max_pool2d(self.conv1(x), 2))
        x = F.leaky_relu(F.max_pool2d(self.conv2(x), 2))
        x = F.leaky_relu(F.max_pool2d(self.conv3(x), 2))
        return F.leaky_relu(self.fc1(x.flatten(1)))


class MnistExtractor(nn.Module):
    """conv5x5(1->16) pool conv5x5(16->32, pad 1) pool fc(800->128); leaky ReLU (official CNN_FMNIST
    for FMNIST and EMNIST)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=1)
        self.fc1 = nn.Linear(800, 128)

    def forward(self, x):
        x = F.leaky_relu(F.max_pool2d(self.conv1(x), 2))
        x = F.leaky_relu(F.max_pool2d(self.conv2(x), 2))
        return F.leaky_relu(self.fc1(x.flatten(1)))


class DigitsExtractor(nn.Module):
    """The same recipe sized for 8x8 digits: conv3x3(1->16, pad 1) pool conv3x3(16->32, pad 1)
    pool fc(128->64). Kept small (13k parameters, so a 1.7M-parameter hypernetwork) so that the
    default run takes about a minute on two CPU cores."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(128, 64)

    def forward(self, x):
        x = F.leaky_relu(F.max_pool2d(self.conv1(x), 2))
        x = F.leaky_relu(F.max_pool2d(self.conv2(x), 2))
        return F.leaky_relu(self.fc1(x.flatten(1)))


class PflExtractor(nn.Module):
    """The CNN of pfl-research's CIFAR-10 benchmark: conv3x3(3->32) conv3x3(32->64) maxpool
    fc(12544->128), ReLU (1,626,442 parameters with its head). Its dropout layers are left out:
    the benchmark measures speed, and random masks would differ between the engine's paths."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(12544, 128)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv2(F.relu(self.conv1(x))), 2))
        return F.relu(self.fc1(x.flatten(1)))


class LeNetExtractor(nn.Module):
    """The LeNet of DLG (mit-han-lab/dlg, models/vision.py) that GradDefense's INFOCOM 2022
    experiments attack: conv5x5(C->12, stride 2) conv5x5(12->12, stride 2) conv5x5(12->12),
    padding 2, sigmoid after each; any input size (32x32 -> 768 features, 8x8 -> 48). PyTorch's
    default init, as GradDefense's code (DLG's own draws U(-0.5, 0.5))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 12, 5, padding=2, stride=2)
        self.conv2 = nn.Conv2d(12, 12, 5, padding=2, stride=2)
        self.conv3 = nn.Conv2d(12, 12, 5, padding=2)

    @staticmethod
    def features(shape: tuple[int, int, int]) -> int:
        return 12 * -(-shape[1] // 4) * -(-shape[2] // 4)

    def forward(self, x):
        x = torch.sigmoid(self.conv1(x))
        x = torch.sigmoid(self.conv2(x))
        return torch.sigmoid(self.conv3(x)).flatten(1)


# name -> (extractor, feature dim, input shape it expects); None: any shape, the extractor
# built from the channel count and its feature dim from the shape
CNNS = {
    "digits_cnn": (DigitsExtractor, 64, (1, 8, 8)),
    "mnist_cnn": (MnistExtractor, 128, (1, 28, 28)),
    "cifar_cnn": (CifarExtractor, 128, (3, 32, 32)),
    "pfl_cnn": (PflExtractor, 128, (3, 32, 32)),
    "lenet": (LeNetExtractor, LeNetExtractor.features, None),
}
