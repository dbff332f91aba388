"""Activation x activation matmuls (attention's ``Q.K^T`` and ``P.V``) on the
int8-class dot-product instructions: AVX-512 VNNI ``vpdpbusd``, ARM NEON ``sdot``,
AVX2 ``vpmaddwd`` on int16 pairs.

Both operands are run-time tensors of 8-bit codes, so nothing can be packed at
compile time. :func:`act_matmul` answers, for a batched matmul
``out[t, i, j] = sum_k a[t, i, k] * b[t, k, j]`` (int8/uint8 codes, int32 result),
a kernel or ``None`` ("not mine": no such instruction on the target, or operand
types it cannot take exactly); :mod:`passes.lower_act_matmul` puts it in the graph
in place of the generic int32 matmul.

The kernel (:mod:`._actdot_tir`):

* **Tasks** are (batch, block of ``J`` column vectors). Each task packs its own
  columns of ``b`` into the instruction's operand layout, ``kv`` consecutive
  ``k`` of one column per 32-bit lane (four row loads and one shuffle per vector),
  in a task-local buffer: no extra pass over memory, no extra kernel.
* **Register tiles** of ``R`` rows x ``J`` vectors: per reduction step one 32-bit
  word of each row of ``a`` (read in place, ``a`` is row-major) is broadcast and
  multiplied into ``J`` packed vectors.
* **Exactness.** ``vpdpbusd`` takes u8 x s8 and NEON ``sdot`` s8 x s8, summing four
  products straight into int32 (no intermediate saturation); for them ``b`` must be
  int8. When ``a`` has the other signedness its bytes are xor-ed with ``0x80``,
  which adds ``off`` = +128 (s8 -> u8) or -128 (u8 -> s8); the kernel subtracts
  ``off * sum_k b[t, k, j]``, computed per task with the same instruction against a
  word of ones. AVX2 (no exact 8-bit instruction: ``vpmaddubsw`` saturates on
  full-range codes) widens both operands to int16 and sums pairs with
  ``vpmaddwd``: every 8-bit code fits, signed or not, no correction. Sums are
  exact in int32 for ``K < 2**16``.
* Shapes that are not whole vectors (``N % VL``) or words (``K % kv``) are packed
  with zero padding and written back with scalar stores in the last block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _isa
from .int8dot import MODES, Mode, _dot

__all__ = ["ActMatmul", "act_matmul", "mode_for", "reference", "default_knobs", "ATTR"]

ATTR = "soniq.act_matmul"  # on every kernel of this module: its instruction and tile, e.g. "avx512-vnni R12 J2"

_MAX_K = 1 << 16  # 255 * 128 * K stays below 2**31


@dataclass(frozen=True)
class ActMatmul:
    """``out[t, i, j] = sum_k a[t, i, k] * b[t, k, j]`` over ``batch`` matrices."""

    batch: int
    m: int
    k: int
    n: int
    a_dtype: str
    b_dtype: str

    @property
    def macs(self) -> int:
        return self.batch * self.m * self.k * self.n


def mode_for(spec: ActMatmul, target) -> Mode | None:
    """The instruction for ``spec`` on ``target``, or None when there is none."""
    codes = ("int8", "uint8")
    if spec.a_dtype not in codes or spec.b_dtype not in codes or spec.k >= _MAX_K:
        return None
    if min(spec.batch, spec.m, spec.k, spec.n) < 1:
        return None
    feats = _isa.features(target)
    if _isa.is_x86(target) and {"avx512f", "avx512bw", "avx512vnni"} <= feats and spec.b_dtype == "int8":
        return MODES["avx512-vnni"]
    if _isa.is_x86(target) and "avx2" in feats:
        return MODES["avx2-wide"]  # int16 pairs: any 8-bit codes, b unsigned too
    if _isa.is_aarch64(target) and {"neon", "dotprod"} <= feats and spec.b_dtype == "int8":
        return MODES["neon-sdot"]
    return None


def default_knobs(spec: ActMatmul, mode: Mode) -> dict:
    """``J`` column vectors and as many rows ``R`` as the registers take (``R * J``
    accumulators, ``J`` operand vectors and a broadcast; 16 ymm registers on AVX2,
    32 zmm / NEON). With 32 registers ``J = 4`` (``R = 6``) while that leaves at
    least 4 tasks (measured on the BERT score matmul: 7.7 us against 9.1 for
    ``R = 12, J = 2``); else ``J = 2`` when it divides the blocks."""
    nb = -(-spec.n // mode.vl)
    regs = 16 if mode.name.startswith("avx2") else 32
    if regs == 32 and nb % 4 == 0 and spec.batch * nb // 4 >= 4:
        j = 4
    else:
        j = 2 if nb % 2 == 0 else 1
    r = max(1, min(spec.m, 12 if j <= 2 else 6, (regs - j - 2) // j))
    while (r + 1) // 2 * j * mode.vl * 4 >= 1024:  # each accumulator half under 1 KiB
        r -= 1
    return {"R": r, "J": j}


def act_matmul(spec: ActMatmul, target, knobs: dict | None = None):
    """The scheduled PrimFunc ``main(a, b, out)`` for ``spec`` on ``target``, or None."""
    mode = mode_for(spec, target)
    if mode is None:
        return None
    k = dict(default_knobs(spec, mode), **(knobs or {}))
    nb = -(-spec.n // mode.vl)
    if not (1 <= k["R"] <= spec.m) or nb % k["J"] or (k["R"] + 1) // 2 * k["J"] * mode.vl * 4 >= 1024:
        raise ValueError(f"act matmul knobs {k} invalid for {spec}")
    from ._actdot_tir import build

    func = build(spec, mode, k, _dot)
    return func.with_attr("tirx.is_scheduled", True).with_attr(ATTR, f"{mode.name} R{k['R']} J{k['J']}")


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The exact result, in numpy: int64 products and sums, returned as int32."""
    return np.matmul(a.astype(np.int64), b.astype(np.int64)).astype(np.int32)

