"""The peers soniq-tvm is measured against, each behind one runner function.

A runner builds its engine once and returns a :class:`PeerRun`: ``fn`` runs one
inference on the fixed input (this is what gets timed), ``outputs`` are the
outputs of that input as NumPy arrays, and ``build_s`` is the set-up time
(session creation, compilation). All peers run with 2 threads.

* ``torch_fp32``: the PyTorch module, ``torch.inference_mode()``.
* ``ort_fp32``: ONNX Runtime, ``ORT_ENABLE_ALL``.
* ``ort_reference``: ONNX Runtime with ``ORT_DISABLE_ALL``. On a QDQ file this
  runs every QuantizeLinear/DequantizeLinear in fp32 around fp32 kernels, i.e. the
  fake-quant semantics of the file; it stands in for the exact-integer reference.
* ``quantize_ort_int8`` + ``ort_fp32`` on its output: ONNX Runtime's static QDQ
  quantization, per channel, which ``ORT_ENABLE_ALL`` fuses into integer kernels.
  The strong INT8 baseline.
* ``tvm_fp32``: ``relax.frontend.onnx.from_onnx`` + ``tvm.compile`` for the host
  CPU, untuned (the default llvm pipeline applies no schedule), run by
  ``relax.VirtualMachine``.

:func:`agreement` compares outputs with a reference; :func:`output_step` finds
the quantization step of a graph output that a DequantizeLinear produces.
"""
from __future__ import annotations

import os

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

NUM_THREADS = 2


@dataclasses.dataclass
class PeerRun:
    """A ready-to-time peer: one-inference callable, its outputs, set-up time."""

    fn: Callable[[], object]
    outputs: list[np.ndarray]
    build_s: float


# --------------------------------------------------------------------------- torch
def torch_fp32(module, inputs: dict[str, np.ndarray]) -> PeerRun:
    import torch

    torch.set_num_threads(NUM_THREADS)
    t0 = time.perf_counter()
    module = module.eval()
    args = [torch.from_numpy(v) for v in inputs.values()]

    def fn():
        with torch.inference_mode():
            return module(*args)

    out = fn()
    build_s = time.perf_counter() - t0
    outs = out if isinstance(out, (tuple, list)) else [out]
    return PeerRun(fn, [o.numpy() for o in outs], build_s)


# --------------------------------------------------------------------------- ORT
def _ort_session(path: Path, optimize: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = NUM_THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_run(path: Path, inputs: dict[str, np.ndarray], optimize: bool) -> PeerRun:
    t0 = time.perf_counter()
    sess = _ort_session(path, optimize)

    def fn():
        return sess.run(None, inputs)

    outs = fn()
    return PeerRun(fn, [np.asarray(o) for o in outs], time.perf_counter() - t0)


def ort_fp32(path: Path, inputs: dict[str, np.ndarray]) -> PeerRun:
    """ONNX Runtime with all graph optimizations (fp32 file or QDQ file)."""
    return _ort_run(path, inputs, optimize=True)


def ort_reference(path: Path, inputs: dict[str, np.ndarray]) -> PeerRun:
    """ONNX Runtime with graph optimizations off: the file's plain semantics."""
    return _ort_run(path, inputs, optimize=False)


def as_qdq(path: Path, workdir: Path) -> Path:
    """``path`` (a QOperator / integer-op file) rewritten as plain QDQ by
    :func:`soniq_tvm.qoperator.to_qdq`, written beside it in ``workdir``."""
    import onnx

    from soniq_tvm.qoperator import to_qdq

    out = Path(workdir) / f"{Path(path).stem}_as_qdq.onnx"
    onnx.save(to_qdq(onnx.load(str(path))), str(out))
    return out


def quantize_ort_int8(
    fp32_path: Path, out_path: Path, calibration: list[dict[str, np.ndarray]], fmt: str = "QDQ"
) -> Path:
    """Static per-channel quantization with ONNX Runtime's quantizer (``fmt``:
    ``"QDQ"`` or ``"QOperator"``).

    Activations QUInt8 (MinMax calibration over ``calibration``), weights QInt8
    per channel, ``reduce_range=False``: ORT's recommendation for x86 CPUs with
    VNNI (this host has AVX-VNNI and AVX512-VNNI).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            return next(self._it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns about pre-processing on every call
    try:
        quantize_static(
            str(fp32_path),
            str(out_path),
            Reader(),
            quant_format=getattr(QuantFormat, fmt),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        root.setLevel(level)
    return Path(out_path)


# --------------------------------------------------------------------------- TVM
def host_target() -> dict:
    """The TVM target for this machine: llvm, the host's mcpu (or ``SONIQ_BENCH_MCPU``,
    set by ``benchmarks.run --mcpu``: e.g. ``haswell`` measures AVX2 code on any
    x86 host), 2 cores."""
    import tvm

    return {
        "kind": "llvm",
        "mcpu": os.environ.get("SONIQ_BENCH_MCPU") or tvm.target.codegen.llvm_get_system_cpu(),
        "num-cores": NUM_THREADS,
    }


def _to_numpy_list(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [o.numpy() for o in out]


def tvm_fp32(path: Path, inputs: dict[str, np.ndarray]) -> PeerRun:
    """Untuned TVM: ONNX -> Relax -> ``tvm.compile`` (default pipeline) -> VM."""
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    t0 = time.perf_counter()
    mod = from_onnx(onnx.load(str(path)))
    ex = tvm.compile(mod, target=tvm.target.Target(host_target()))
    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(v, dev) for v in inputs.values()]
    main = vm["main"]

    def fn():
        return main(*args)

    build_s = time.perf_counter() - t0
    return PeerRun(fn, _to_numpy_list(fn()), build_s)


def soniq_file(path: Path, inputs: dict[str, np.ndarray]) -> PeerRun:
    """soniq-tvm compiling a given file (an ORT-quantized one) for this host, untuned."""
    import soniq_tvm

    t0 = time.perf_counter()
    compiled = soniq_tvm.compile(str(path), target=host_target(), probes=False)
    build_s = time.perf_counter() - t0

    def fn():
        return compiled.run(inputs)

    return PeerRun(fn, [np.asarray(o) for o in fn()], build_s)


# --------------------------------------------------------------------------- agreement
@dataclasses.dataclass(frozen=True)
class Agreement:
    """How closely a peer's outputs follow a reference, over all output elements.

    With a quantization ``step`` (the output comes out of a DequantizeLinear), an
    element matches when it has the same integer code as the reference
    (``|diff| < step / 2``); otherwise when ``|diff| <= 1e-4 * |ref| + 1e-5 * max|ref|``.
    """

    match_fraction: float
    max_abs_diff: float
    ref_max_abs: float  # max |reference|, to read max_abs_diff against
    step: float | None
    reference: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        s = f"{100 * self.match_fraction:.2f}% max|d|={self.max_abs_diff:.3g}"
        if self.step:
            return s + f" ({self.max_abs_diff / self.step:.3g} step)"
        if self.max_abs_diff and self.ref_max_abs:
            return s + f" (rel {self.max_abs_diff / self.ref_max_abs:.2g})"
        return s


def agreement(
    outputs: list[np.ndarray], reference: list[np.ndarray], reference_name: str, step: float | None = None
) -> Agreement:
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs vs {len(reference)} reference outputs")
    matched = total = 0
    max_diff = ref_max = 0.0
    for out, ref in zip(outputs, reference):
        out = np.asarray(out, np.float64)
        ref = np.asarray(ref, np.float64)
        if out.shape != ref.shape:
            raise ValueError(f"output shape {out.shape} vs reference shape {ref.shape}")
        diff = np.abs(out - ref)
        if step:
            ok = diff < step / 2
        else:
            ok = diff <= 1e-4 * np.abs(ref) + 1e-5 * float(np.abs(ref).max(initial=0.0))
        matched += int(ok.sum())
        total += ok.size
        max_diff = max(max_diff, float(diff.max(initial=0.0)))
        ref_max = max(ref_max, float(np.abs(ref).max(initial=0.0)))
    return Agreement(matched / max(total, 1), max_diff, ref_max, step, reference_name)


def output_step(qdq_path: Path) -> float | None:
    """The scale of the DequantizeLinear producing the (first) graph output, if scalar."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_path), load_external_data=False)
    graph = model.graph
    out_name = graph.output[0].name
    producer = next((n for n in graph.node if out_name in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    inits = {t.name: t for t in graph.initializer}
    scale = inits.get(producer.input[1])
    if scale is None:
        return None
    value = numpy_helper.to_array(scale)
    return float(value) if value.size == 1 else None
