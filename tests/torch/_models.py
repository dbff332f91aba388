"""Small models shared by the torch tests (built in code, seeded)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits_qat.py"


def load_example():
    """``examples/digits_qat.py`` as a module (data, models and training loop)."""
    name = "soniq_examples_digits_qat"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, conv-ReLU, max-pool, flatten, linear: 8x8 inputs, 10 classes.
    Channel counts (5, 7) are deliberately not multiples of anything."""

    def __init__(self, cin: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 7, 3, stride=1, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(7 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def settled_cnn(seed: int = 0, cin: int = 1) -> SmallCNN:
    """A SmallCNN with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    m = SmallCNN(cin)
    with torch.no_grad():
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.uniform_(-0.2, 0.2)
        m.train()
        for _ in range(3):
            m(torch.rand(32, cin, 8, 8))
    return m.eval()


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-3,
        penalty: bool = False, seed: int = 0) -> None:
    """A few Adam steps of cross-entropy (+ bit penalty) on ``x, y``."""
    from soniq_tvm.torch import bit_penalty

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if penalty:
            loss = loss + bit_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
