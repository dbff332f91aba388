"""Depthwise convolutions (one input channel per group), which the dot-product
families do not take (a reduction of ``KH * KW`` values leaves their 4-wide
dot products mostly empty).

The kernel vectorizes along the output row instead: ``V`` consecutive output
pixels of one channel are one vector, and each filter tap is one fused
multiply-add of the activation vector at that tap with the tap's weight
broadcast. The arithmetic is **float32, exact**: activations and weights are
integers of at most 8 bits, and every partial sum of the ``KH * KW`` products is
bounded by ``KH * KW * max|x| * max|w| <= 2**24`` (checked per op: 256 taps even
for unsigned 8 x 8 bits, 1024 for signed), where float32 represents every integer
exactly, so no ``fma`` rounds.

* One task per input channel plane (parallel over ``n, c``): the plane is re-laid
  out at run time as zero-padded float32 rows in a task-local buffer (it stays in
  L1/L2: a whole-tensor float copy made the kernel memory-bound), then every
  output row of the plane's output channels (channel multiplier ``O / C``) is
  computed from it, ``min(8, row vectors)`` independent accumulators at a time.
* Weights are packed at compile time as ``int8[O, KH * KW]`` (one byte each,
  the widest width this family takes); the kernel converts each tap once per
  output row.
* Vectors overlap at the end of a row instead of having a scalar tail; a strided
  tap loads ``SW * V`` contiguous floats and keeps every ``SW``-th (a shuffle).

Plain TIR vector code (no target intrinsics): it compiles for any LLVM CPU
target.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from soniq_tvm.qop import QOp, check_weights, reference, weight_range

from . import _isa
from .int8dot import Geometry

__all__ = ["DepthwiseFamily", "DEPTHWISE"]

EXACT_FLOAT = 1 << 24  # float32 holds every integer up to here


def _amax(op: QOp) -> int:
    return (1 << (op.a_bit - 1)) if op.a_signed else (1 << op.a_bit) - 1


class DepthwiseFamily:
    """Depthwise conv2d, float32-exact vector FMAs along the output row.

    Knob: ``V`` output pixels per vector (default 16, capped at the output width;
    LLVM splits it into two ymm registers without AVX-512).
    """

    name = "cpu-depthwise"

    def accepts(self, op: QOp, target) -> bool:
        if op.a_zero or not op.uniform or op.kind != "conv2d" or target is None or target.kind.name != "llvm":
            return False
        if not (_isa.is_x86(target) or _isa.is_aarch64(target)):
            return False
        g = Geometry.of(op)
        if not (g.cg == 1 and g.groups > 1) or g.ow < 2:
            return False  # one output column: no vector of pixels to fill
        if op.a_dtype not in ("int8", "uint8") or op.a_bit > 8 or op.w_bit > 8:
            return False
        return g.kh * g.kw * _amax(op) * max(abs(v) for v in weight_range(op.w_bit, op.w_signed)) <= EXACT_FLOAT

    def _rate(self, target) -> float:
        """MACs per cost unit (the int8-dot families' scale), from the 3x3 depthwise
        benchmark in benchmarks/kernels.py (1x128x56x56: ~135 us on the dev host, zmm
        and ymm alike: the activation re-layout and the loads dominate)."""
        f = _isa.features(target)
        if "avx2" in f or _isa.is_aarch64(target):
            return 8.0
        return 2.0

    def cost(self, op: QOp, target) -> float | None:
        if not self.accepts(op, target):
            return None
        g = Geometry.of(op)
        relayout = g.n * g.c * (g.h + 2) * (g.w + 2) / 8.0
        return float(op.macs / self._rate(target) + relayout + np.prod(op.out_shape))

    def knob_space(self, op: QOp, target=None) -> dict[str, list]:
        ow = Geometry.of(op).ow
        return {"V": sorted({min(v, ow) for v in (4, 8, 16, 32)})}

    def knobs(self, op: QOp) -> dict:
        g = Geometry.of(op)
        v = min(int((op.knobs or {}).get("V", 16)), g.ow)
        if v < 1:
            raise ValueError(f"{self.name}: V={v} invalid for {op.layer}")
        return {"V": v}

    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]:
        w = np.asarray(w).astype(np.int64)
        check_weights(w, op)
        dt = np.uint8 if weight_range(op.w_bit, op.w_signed)[1] > 127 else np.int8  # u8 weights need the byte
        return [np.ascontiguousarray(w.reshape(w.shape[0], -1).astype(dt))]

    def unpack(self, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        return np.asarray(packed[0]).astype(np.int64).reshape(op.w_shape)

    def reference(self, x, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        return reference(x, self.unpack(packed, op), op)

    def primfunc(self, op: QOp, target=None):
        from ._depthwise_tir import build

        knobs = self.knobs(op)
        _, hi = weight_range(op.w_bit, op.w_signed)
        f = _isa.features(target) if target is not None else frozenset()
        regs = (32, 64) if "avx512f" in f else (16, 32) if "avx" in f or "avx2" in f else (16, 16)
        if target is not None and _isa.is_aarch64(target):
            regs = (32, 16)
        func = build(op, Geometry.of(op), knobs, "uint8" if hi > 127 else "int8", *regs)
        tagged = op.with_(family=self.name, knobs=knobs)
        return func.with_attr("soniq.qop", tagged.to_json()).with_attr("tirx.is_scheduled", True)


DEPTHWISE = DepthwiseFamily()
