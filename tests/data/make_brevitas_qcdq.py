"""Regenerate ``brevitas_digits_w4a4_qcdq.onnx`` (and ``..._qonnx.onnx``): a 2-layer
Brevitas model trained on scikit-learn's digits, 4-bit weights (per output channel)
and 4-bit activations, exported by Brevitas itself as QCDQ (QuantizeLinear -> Clip ->
DequantizeLinear) or as QONNX (``Quant`` nodes; ``--qonnx``).

Needs ``brevitas`` (``pip install brevitas onnxoptimizer``), which the suite does not
install: the test reads the committed file, and reruns this script where brevitas
is present (``tests/test_brevitas_qcdq.py``).

    python tests/data/make_brevitas_qcdq.py [--qonnx] [OUT.onnx]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def build(out: Path, epochs: int = 30, seed: int = 0, fmt: str = "qcdq") -> Path:
    """Train the model and export it as ``fmt``: "qcdq" (``export_onnx_qcdq``) or
    "qonnx" (``export_qonnx``: QONNX Quant nodes)."""
    import brevitas.nn as qnn
    import torch
    from brevitas.export import export_onnx_qcdq, export_qonnx
    from brevitas.quant import Int8WeightPerChannelFloat
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(bit_width=4, return_quant_tensor=True)
            self.conv = qnn.QuantConv2d(1, 8, 3, padding=1, weight_bit_width=4, bias=False,
                                        weight_quant=Int8WeightPerChannelFloat, return_quant_tensor=True)
            self.relu = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
            self.fc = qnn.QuantLinear(8 * 8 * 8, 10, bias=True, weight_bit_width=4,
                                      weight_quant=Int8WeightPerChannelFloat)

        def forward(self, x):
            return self.fc(torch.flatten(self.relu(self.conv(self.inp(x))), 1))

    digits = load_digits()
    x = torch.tensor(digits.images[:1500] / 16.0 * 2 - 1, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target[:1500])
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(epochs):
        for i in range(0, len(x), 100):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    net.eval()
    if fmt == "qonnx":
        export_qonnx(net, args=x[:1], export_path=str(out), opset_version=13, dynamo=False)
    else:
        export_onnx_qcdq(net, args=x[:1], export_path=str(out), opset_version=13, dynamo=False)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    fmt = "qonnx" if "--qonnx" in args else "qcdq"
    args = [a for a in args if a != "--qonnx"]
    target = Path(args[0]) if args else Path(__file__).with_name(f"brevitas_digits_w4a4_{fmt}.onnx")
    print(build(target, fmt=fmt))
