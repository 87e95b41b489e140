"""Small models whose rewritten sites a recheck can push out of their regions (tests/runtime/test_recheck.py)."""

from __future__ import annotations

import torch
from torch import nn


class DriftNet(nn.Module):
    """conv1 -> ReLU always ON on inputs >= 0 (linearized) -> 1x1 conv2 -> ReLU with dead channels (masked) -> head.

    Negated inputs switch relu1's neurons OFF; inputs scaled by 10 make conv2's channels 0 and 1 (bias -20, weights
    >= 0) fire. ``seed`` draws other weights (another checkpoint of the same architecture).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.conv1.weight.abs_()
            self.conv1.bias.fill_(1.0)  # far from 0: the compile's perturbation search cannot move it
            self.conv2.weight[:2].abs_()
            self.conv2.bias[:2] = -20.0

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


class SmoothNet(nn.Module):
    """Linear -> GELU on inputs near 5 (an affine surrogate within 1e-5) -> two outputs: class scores and a sum."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc1.weight.mul_(0.1)
            self.fc1.bias.fill_(5.0)

    def forward(self, x):
        hidden = self.act(self.fc1(x))
        return self.fc2(hidden), hidden.sum(1, keepdim=True)
