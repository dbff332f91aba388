"""SONIQ quantization-aware training and export (needs PyTorch).

::

    from soniq_tvm.torch import prepare, snap, export_onnx, bit_penalty
    qmodel = prepare(model, palette=(2, 8), target_bits=3.0)  # swaps Conv2d/Linear
    train(qmodel)          # phase 1: loss = task_loss + bit_penalty(qmodel)
    snap(qmodel)           # each channel takes one palette level
    train(qmodel)          # phase 2: real quantization, straight-through gradients
    export_onnx(qmodel, example_input, "model.onnx")          # soniq-qdq/1

``import soniq_tvm`` never imports this package; importing it imports torch.
``docs/qat.md`` describes the method and its knobs.
"""
from __future__ import annotations

from .export import export_onnx
from .modules import ActQuant, Precision, QConv2d, QLinear, QMatMul
from .prepare import QATConfig, average_bits, bit_penalty, bit_report, prepare, quant_layers, snap

__all__ = [
    "prepare",
    "snap",
    "export_onnx",
    "bit_penalty",
    "average_bits",
    "bit_report",
    "quant_layers",
    "QATConfig",
    "QConv2d",
    "QLinear",
    "QMatMul",
    "ActQuant",
    "Precision",
]
