"""The benchmark models, built in code with seeded random weights (no downloads).

Each model is a PyTorch module exported to fp32 ONNX (opset 17, IR version <= 10)
through the TorchScript exporter (``dynamo=False``; the dynamo exporter needs
onnxscript, which the project does not depend on).

* ``resnet18``: ResNet-18 (BasicBlock, [2, 2, 2, 2]) at 224x224, 1000 classes.
  ``tiny``: 32x32, widths 8/16/32/64, 10 classes.
* ``bert``: a BERT-like encoder on hidden states ``[1, 128, 256]`` (no embeddings):
  4 post-LN layers, 4 heads, FFN 1024, GELU. ``tiny``: 1 layer, seq 16, hidden 64.
* ``gemv``: one decode-style ``Linear(4096, 4096)`` on ``[1, 4096]``. ``tiny``: 256.

The modules stay within what ``soniq_tvm.torch`` can prepare and export, so the
soniq rows start from the same weights: every ReLU is its own module (the
exporter names tensors after modules), q/k/v are separate Linears (as in BERT;
no ``split``), and the GEMV's Linear sits inside a module (fx would trace a bare
root Linear as ``F.linear``).

BatchNorm running statistics are set by a few forward passes in training mode on
random data (``_settle_batchnorm``), so activations stay in a realistic range and
calibration-based INT8 quantization behaves as on a trained network.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np

MODEL_NAMES = ("resnet18", "bert", "gemv")
OPSET = 17
MAX_IR_VERSION = 10


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A built benchmark model: its ONNX file and how to feed it."""

    name: str
    tiny: bool
    onnx_path: Path
    input_name: str
    input_shape: tuple[int, ...]
    module: object  # the torch.nn.Module (eval mode), for the PyTorch peer

    def random_input(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(self.input_shape, dtype=np.float32)
        return {self.input_name: x}


# --------------------------------------------------------------------------- torch
def _torch_modules():
    """Module classes, defined lazily so importing this file does not import torch."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            # one module per use: the SONIQ exporter names tensors after modules
            self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = self.relu1(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu2(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self, widths=(64, 128, 256, 512), num_classes=1000, small_input=False):
            super().__init__()
            w0 = widths[0]
            if small_input:  # CIFAR-style stem for 32x32 inputs
                self.stem = nn.Sequential(
                    nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True)
                )
            else:
                self.stem = nn.Sequential(
                    nn.Conv2d(3, w0, 7, 2, 3, bias=False),
                    nn.BatchNorm2d(w0),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1),
                )
            layers, cin = [], w0
            for i, w in enumerate(widths):
                stride = 1 if i == 0 else 2
                layers += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
                cin = w
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            y = self.pool(self.layers(self.stem(x)))
            return self.fc(torch.flatten(y, 1))

    class EncoderLayer(nn.Module):
        def __init__(self, hidden: int, heads: int, ffn: int):
            super().__init__()
            self.heads, self.head_dim = heads, hidden // heads
            self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
            self.proj = nn.Linear(hidden, hidden)
            self.ln1 = nn.LayerNorm(hidden)
            self.fc1 = nn.Linear(hidden, ffn)
            self.fc2 = nn.Linear(ffn, hidden)
            self.ln2 = nn.LayerNorm(hidden)
            self.act = nn.GELU()

        def forward(self, x):
            b, s, h = x.shape
            q, k, v = (
                proj(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
                for proj in (self.q, self.k, self.v)
            )
            att = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, s, h)
            x = self.ln1(x + self.proj(ctx))
            return self.ln2(x + self.fc2(self.act(self.fc1(x))))

    class Encoder(nn.Module):
        def __init__(self, layers: int, hidden: int, heads: int, ffn: int):
            super().__init__()
            self.layers = nn.Sequential(*(EncoderLayer(hidden, heads, ffn) for _ in range(layers)))

        def forward(self, x):
            return self.layers(x)

    class Gemv(nn.Module):
        def __init__(self, features: int):
            super().__init__()
            self.fc = nn.Linear(features, features)

        def forward(self, x):
            return self.fc(x)

    return ResNet18, Encoder, Gemv


# Architecture hyper-parameters: (full, tiny).
_SPECS = {
    "resnet18": (
        dict(widths=(64, 128, 256, 512), num_classes=1000, small_input=False, image=224),
        dict(widths=(8, 16, 32, 64), num_classes=10, small_input=True, image=32),
    ),
    "bert": (
        dict(layers=4, hidden=256, heads=4, ffn=1024, seq=128),
        dict(layers=1, hidden=64, heads=2, ffn=128, seq=16),
    ),
    "gemv": (dict(features=4096), dict(features=256)),
}


def _make_module(name: str, tiny: bool, seed: int):
    import torch
    from torch import nn

    if name not in _SPECS:
        raise ValueError(f"unknown benchmark model {name!r}; expected one of {MODEL_NAMES}")
    spec = dict(_SPECS[name][1 if tiny else 0])
    torch.manual_seed(seed)
    ResNet18, Encoder, Gemv = _torch_modules()
    if name == "resnet18":
        image = spec.pop("image")
        module = ResNet18(**spec)
        _settle_batchnorm(module, (4, 3, image, image))
        shape = (1, 3, image, image)
    elif name == "bert":
        seq = spec.pop("seq")
        module = Encoder(**spec)
        shape = (1, seq, spec["hidden"])
    else:
        module = Gemv(**spec)
        shape = (1, spec["features"])
    return module.eval(), shape


def _settle_batchnorm(module, shape, steps: int = 2) -> None:
    """Give BatchNorm layers the running statistics of random data (cumulative mean)."""
    import torch
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative moving average over the steps below
            m.reset_running_stats()
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(torch.randn(shape))
    module.eval()


def export_onnx(module, shape: tuple[int, ...], path: Path, input_name: str = "x") -> None:
    """Export ``module`` to fp32 ONNX at ``path`` (opset 17, IR version <= 10)."""
    import onnx
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but stable
        torch.onnx.export(
            module,
            (torch.zeros(shape),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[input_name],
            output_names=["y"],
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save(model, str(path))
    onnx.checker.check_model(model)


def build(name: str, workdir: Path, tiny: bool = False, seed: int = 0) -> BenchModel:
    """Build model ``name`` with seeded weights and write ``<workdir>/<name>[_tiny].onnx``."""
    module, shape = _make_module(name, tiny, seed)
    path = Path(workdir) / f"{name}{'_tiny' if tiny else ''}.onnx"
    export_onnx(module, shape, path)
    return BenchModel(name, tiny, path, "x", shape, module)
