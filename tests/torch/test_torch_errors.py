"""Unsupported layers and operations raise ExportError naming the module."""
from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from soniq_tvm import ExportError, SoniqError  # noqa: E402
from soniq_tvm.torch import export_onnx, prepare  # noqa: E402

pytestmark = pytest.mark.torch


class Wrap(nn.Module):
    """``features`` (a Sequential) then an optional tail callable."""

    def __init__(self, *layers, tail=None):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.tail = tail

    def forward(self, x):
        x = self.features(x)
        return self.tail(x) if self.tail is not None else x


@pytest.mark.parametrize("layer,path,what", [
    (nn.Conv1d(3, 4, 3), "features.1", "Conv1d"),
    (nn.ConvTranspose2d(3, 4, 3), "features.1", "ConvTranspose2d"),
    (nn.Conv2d(4, 4, 3, groups=2), "features.1", "groups=2"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "features.1", "padding_mode"),
    (nn.Embedding(10, 4), "features.1", "Embedding"),
    (nn.MultiheadAttention(4, 2), "features.1", "MultiheadAttention"),
    (nn.LSTM(4, 4), "features.1", "LSTM"),
    (nn.BatchNorm1d(4), "features.1", "BatchNorm1d"),
    (nn.PReLU(), "features.1", "PReLU"),
])
def test_prepare_rejects_unsupported_layers(layer, path, what):
    model = Wrap(nn.Identity(), layer)
    with pytest.raises(ExportError, match=what) as info:
        prepare(model, palette=(2, 8), target_bits=4.0)
    assert info.value.node == path
    assert path in str(info.value)
    assert isinstance(info.value, SoniqError)


def test_batchnorm_without_conv_before_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.relu(self.conv(x)))

    with pytest.raises(ExportError, match="BatchNorm2d must directly follow a Conv2d") as info:
        prepare(Net(), palette=(2, 8), target_bits=4.0)
    assert info.value.node == "bn"


def test_raw_parameters_are_rejected_with_the_owner():
    """A module holding its own weight (used through F.linear) is refused by path."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return nn.functional.linear(x, self.w)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Head()

        def forward(self, x):
            return self.head(x)

    with pytest.raises(ExportError, match="Head is not supported") as info:
        prepare(Net(), palette=(2, 8), target_bits=4.0)
    assert info.value.node == "head"


def test_functional_conv_on_a_buffer_is_rejected_with_the_owner():
    class Blur(nn.Module):
        def forward(self, x):
            k = torch.ones(1, 1, 3, 3) / 9
            return nn.functional.conv2d(x, k)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blur = Blur()

        def forward(self, x):
            return self.blur(x)

    with pytest.raises(ExportError, match="functional conv2d") as info:
        prepare(Net(), palette=(2, 8), target_bits=4.0)
    assert info.value.node.startswith("blur:")


def test_untraceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(ExportError, match="torch.fx cannot trace"):
        prepare(Branchy(), palette=(2, 8), target_bits=4.0)


def test_export_names_the_unsupported_operation():
    model = Wrap(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Upsample(scale_factor=2))
    q = prepare(model, palette=(2, 8), target_bits=4.0)
    with pytest.raises(ExportError, match="Upsample") as info:
        export_onnx(q, torch.rand(1, 1, 6, 6))
    assert info.value.node == "features.2"


def test_export_rejects_unprepared_models():
    with pytest.raises(ExportError, match="prepare"):
        export_onnx(nn.Linear(3, 3), torch.rand(1, 3))


def test_import_soniq_tvm_does_not_import_torch():
    code = "import soniq_tvm, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
