"""Small models and data the prune tests share."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_export.prune.training import OptimConfig, as_dataset, train


class SharedAndFunctional(nn.Module):
    """One nn.ReLU called at two sites, a functional relu, a method relu, a residual add, a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.drop = nn.Dropout(0.1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))  # site 1 of the shared module
        b = self.relu(self.drop(self.conv2(a)) + a)  # site 2: through a residual add (skip is not a layer)
        c = F.relu(self.conv3(b))  # functional
        d = torch.cat([c, b], dim=1).relu()  # method call after a concat: no layer
        return self.fc(d.mean((2, 3)))


class DownsampleBlock(nn.Module):
    """A ResNet basic block whose shortcut is a strided 1x1 conv + BN (torchvision's ``downsample``), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.downsample = nn.Sequential(nn.Conv2d(2, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.downsample(x)
        return self.fc(self.relu(out).mean((2, 3)))


class Tiny(nn.Module):
    """conv-ReLU, a residual conv block, and a Linear-ReLU-Linear head on 1x6x6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(8, 16)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x) + x)
        return self.fc2(self.relu3(self.fc1(x.mean((2, 3)))))


def data(samples: int = 96, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 1, 6, 6, generator=generator)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return x, y


def tiny(seed: int = 0) -> Tiny:
    """A Tiny trained to well above chance (so that pruning everything visibly costs accuracy)."""
    torch.manual_seed(seed)
    model = Tiny()
    train(model, as_dataset(data(256, 2), "tiny"), OptimConfig(epochs=15, optimizer="adam", lr=0.01, batch_size=32), seed=seed)
    return model.eval()


# One fine-tuning epoch with a small learning rate: fast, and enough to change weights.
FAST = {"epochs_per_iteration": 1, "batch_size": 32, "lr": 0.01, "progress": False}
