"""Packed low-bit weights: ``w_bit <= 4`` weights stored at their width, expanded
to bytes in registers right before the int8-class dot product.

The int8-dot families store one byte per weight, so a 2-bit layer streams 4x the
bytes of its width; at batch 1 (GEMV, decode-style dense layers) that traffic is
the cost. This family keeps the int8-dot kernel skeleton (broadcast activations,
``VL`` output channels x 4 reduction values per vector, an ``R`` pixel x ``J``
channel-block register tile, see :mod:`.int8dot`) but stores the weights as
**fields**: one byte of the packed vector holds the codes of ``F = 8 / bs`` channel
blocks (``bs`` = stored bits: the width, 4 for 3-bit weights), field ``f`` in bits
``[bs*f, bs*f + bs)``. A tile is ``J = JP * F`` channel blocks: per reduction step it
loads ``JP`` packed vectors and makes the ``F`` operands of each with **one AND**
(plus a 16-bit shift for at most one field on AVX2):

* Weight codes are unsigned, ``w = s * u - z``: signed ``b >= 2`` bits are stored
  offset-binary ``u = w + 2**(b-1)`` (``s = 1``), bipolar 1-bit ``u = (w + 1) / 2``
  (``s = 2, z = 1``), unsigned ``u = w``. The codes are the *unsigned* operand of
  ``vpdpbusd`` / ``vpmaddubsw`` and the activations the *signed* one.
* Field ``f`` is used **in place, not shifted down**: the operand is
  ``u * 2**e_f`` (``e_f = bs*f``), which still fits the unsigned byte, and it goes
  to its own accumulator (its own channel block), so the epilogue divides it
  exactly with an arithmetic shift ``acc >> e_f``. On AVX2 the ``vpmaddubsw`` pair
  sum must stay below 2**15: scaled codes must be <= 127, so a top field above
  that is shifted right once first (``e_f = bs*f - 1``).

**Exactness.** Activations become the signed operand ``xs = x + off`` (``off =
-128`` for unsigned 8-bit activations, else 0), spatial padding holds ``off``
(the code of x = 0), channel padding 0. Then

    sum x*w = s * sum xs*u - z * sum xs - off * sum w

``sum xs`` over the reduction window is a per-pixel term (``psum``: the channel
sums of each input pixel, made with the activation re-layout, summed over the
window in the epilogue); ``off * sum w`` is a per-channel constant from
:meth:`pack`. Instruction bounds: ``vpdpbusd`` sums four u8 x s8 products into
int32 without saturation; ``vpmaddubsw`` pairs are at most ``2 * 127 * 128 <
2**15``, widened at once by ``vpmaddwd`` with ones. The scaled int32 accumulator
is bounded by ``K * 255 * 128 < 2**31`` for reductions up to 65536 (checked).

**Tile.** ``R`` pixels x ``J`` channel blocks of accumulators, kept in two buffers
(fields below and above ``F/2``) so that each stays under TVM's 1 KiB stack
limit and lives in registers; the default picks the largest tile whose
accumulators, packed vectors, broadcasts and ``F`` masks fit the register file
(over it LLVM spills) and whose channel padding (``O`` rounded up to ``J * VL``)
is smallest. Output channels per tile are ``J * VL`` (128 for 1-bit zmm): small
``O`` pays for the padding, which the cost counts.

Instances: ``x86-avx512-lowbit`` (zmm ``vpdpbusd``, AVX512-VNNI),
``x86-avxvnni-lowbit`` (ymm ``{vex} vpdpbusd``, AVX-VNNI without AVX-512, e.g.
Alder Lake) and ``x86-avx2-lowbit`` (ymm ``vpmaddubsw`` + ``vpmaddwd``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from soniq_tvm.qop import QOp, check_weights, reference

from . import _isa
from .int8dot import Geometry

__all__ = ["LowbitFamily", "AVX512_LOWBIT", "AVXVNNI_LOWBIT", "AVX2_LOWBIT", "LowbitMode", "fields", "codes"]

KV = 4  # reduction values per int32 lane (vpdpbusd quads; vpmaddubsw pairs + vpmaddwd)
MAX_REDUCTION = 65536  # K * 255 * 128 < 2**31 for the scaled accumulators


@dataclass(frozen=True)
class LowbitMode:
    """``vl`` int32 lanes per vector; ``limit``: the largest scaled code the
    unsigned operand may hold exactly; ``regs``: vector registers."""

    name: str
    vl: int
    limit: int
    regs: int


MODES = {
    "vnni512": LowbitMode("vnni512", 16, 255, 32),
    "vnni256": LowbitMode("vnni256", 8, 255, 16),
    "madd256": LowbitMode("madd256", 8, 127, 16),
}


def store_bits(w_bit: int) -> int:
    """Bits of one stored field (3-bit weights use 4-bit fields: 8 is not a multiple of 3)."""
    return 4 if w_bit == 3 else w_bit


def codes(op: QOp) -> tuple[int, int]:
    """``(s, z)`` of the unsigned weight code ``u``: ``w = s * u - z``."""
    if op.bipolar:
        return 2, 1
    if op.w_signed:
        return 1, 1 << (op.w_bit - 1)
    return 1, 0


def fields(op: QOp, mode: LowbitMode) -> list[tuple[int, int, int]]:
    """``(shift, mask, exponent)`` per field: the operand of field ``f`` is
    ``(packed >> shift) & mask``, which equals ``u * 2**exponent``."""
    bs = store_bits(op.w_bit)
    umax = (1 << op.w_bit) - 1
    out = []
    for f in range(8 // bs):
        sh = 0
        while (umax << (bs * f - sh)) > mode.limit:
            sh += 1
        out.append((sh, umax << (bs * f - sh), bs * f - sh))
    return out


def act_offset(op: QOp) -> int:
    """Shift of the activations into the signed byte operand."""
    if not op.a_signed and op.a_bit >= 8:
        return -128
    return 0


class LowbitFamily:
    """Packed-weight low-bit dot products (see the module docstring).

    Knobs (``op.knobs``): ``R`` pixels (matmul rows) per tile, ``JP`` packed vectors
    per tile (``J = JP * F`` channel blocks).
    """

    max_bits = 4

    def __init__(self, name: str, mode: str, need: Sequence[str], rates: dict):
        self.name = name
        self.mode = MODES[mode]
        self.need = tuple(need)
        self.rates = dict(rates)

    # ---- applicability --------------------------------------------------------------
    def _target_ok(self, target) -> bool:
        if target is None or target.kind.name != "llvm" or not _isa.is_x86(target):
            return False
        return all(x in _isa.features(target) for x in self.need)

    def accepts(self, op: QOp, target) -> bool:
        if op.a_zero or not op.uniform or not self._target_ok(target):
            return False
        if op.a_dtype not in ("int8", "uint8") or op.a_bit > 8 or op.w_bit > self.max_bits:
            return False
        g = Geometry.of(op)
        if not g.matmul and g.cg == 1 and g.groups > 1:
            return False  # depthwise: cpu-depthwise
        return g.kh * g.kw * math.ceil(g.cg / KV) * KV <= MAX_REDUCTION

    def cost(self, op: QOp, target) -> float | None:
        """Time in the int8-dot families' units: the larger of the arithmetic (padded
        MACs at this family's measured rate: ``macs_r1`` for one-row tiles, where
        nothing shares the AND that expands a field, ``macs_mm`` for matmul tiles of
        several rows, ``macs`` for conv tiles) and the packed-weight stream (bytes at
        the rate this kernel streams them from beyond L2), plus the activation
        re-layout and the epilogue."""
        if not self.accepts(op, target):
            return None
        g = Geometry.of(op)
        lay = self.layout(op)
        padded = g.n * g.groups * lay["ogp"] * g.oh * g.ow * g.kh * g.kw * lay["cgp"]
        if self.knobs(op)["R"] == 1:
            rate = self.rates["macs_r1"]
        else:
            rate = self.rates["macs_mm" if g.matmul else "macs"]
        compute = padded / rate
        stream = self.packed_weight_bytes(op) / self.rates["bytes"]
        relayout = g.n * (g.h + 2) * (g.w + 2) * g.c / 8.0
        return float(max(compute, stream) + relayout + 2.0 * np.prod(op.out_shape))

    # ---- layout and knobs ----------------------------------------------------------------
    def nfields(self, op: QOp) -> int:
        return 8 // store_bits(op.w_bit)

    def _jp_options(self, op: QOp) -> list[int]:
        g = Geometry.of(op)
        ob = math.ceil(g.og / self.mode.vl)
        f = self.nfields(op)
        need = math.ceil(ob / f)  # packed vectors that cover the group's channels
        return [jp for jp in range(1, 9) if jp * f <= 16 and (jp == 1 or jp <= need)]

    def _fits(self, r: int, j: int) -> bool:
        # two accumulator buffers, each under TVM's 1 KiB stack-allocation limit (registers)
        return r * j * self.mode.vl * 2 < 1024

    def knob_space(self, op: QOp, target=None) -> dict[str, list]:
        g = Geometry.of(op)
        f = self.nfields(op)
        return {"R": [r for r in range(1, 9) if r <= g.ow and self._fits(r, f)],
                "JP": [jp for jp in self._jp_options(op) if self._fits(1, jp * f)]}

    def default_knobs(self, op: QOp) -> dict:
        g = Geometry.of(op)
        f = self.nfields(op)
        regs = self.mode.regs
        best = None
        for jp in self._jp_options(op):
            j = jp * f
            for r in range(1, min(8, g.ow) + 1):
                # accumulators + packed vectors + one operand + broadcasts + F masks
                # (over 32 zmm, LLVM spills: 2-bit R=3 JP=2 ran 1.7x slower than R=2)
                if r * j + jp + 1 + r + f > regs or not self._fits(r, j):
                    continue
                waste = math.ceil(g.ow / r) * r / g.ow
                ob = math.ceil(g.og / self.mode.vl)
                owaste = math.ceil(ob / j) * j / ob
                score = (r * j) / (r + jp) / waste / owaste ** 3
                if best is None or score > best[0] + 1e-9:
                    best = (score, r, jp)
        if best is None:  # 1-bit on 16 registers: the masks come from memory operands
            return {"R": 1, "JP": 1}
        return {"R": best[1], "JP": best[2]}

    def knobs(self, op: QOp) -> dict:
        k = self.default_knobs(op)
        k.update({key: v for key, v in (op.knobs or {}).items() if key in ("R", "JP")})
        g = Geometry.of(op)
        if not (1 <= k["R"] <= g.ow) or k["JP"] < 1 or not self._fits(k["R"], k["JP"] * self.nfields(op)):
            raise ValueError(f"{self.name}: knobs {k} invalid for {op.layer} (ow={g.ow})")
        return k

    def layout(self, op: QOp) -> dict:
        g = Geometry.of(op)
        vl = self.mode.vl
        f = self.nfields(op)
        jp = self.knobs(op)["JP"]
        j = jp * f
        ob = math.ceil(g.og / vl)
        obt = math.ceil(ob / j)
        cb = math.ceil(g.cg / KV)
        return {"F": f, "JP": jp, "J": j, "obt": obt, "ogp": obt * j * vl, "cb": cb, "cgp": cb * KV}

    def packed_weight_bytes(self, op: QOp) -> int:
        g = Geometry.of(op)
        lay = self.layout(op)
        return g.groups * lay["obt"] * g.kh * g.kw * lay["cb"] * lay["JP"] * self.mode.vl * KV

    # ---- packing ---------------------------------------------------------------------------
    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]:
        """``[wp uint8[G, OBT, KH, KW, CB, JP, VL*4], corr int32[G, OGP]]``: byte
        ``lane*4 + q`` of packed vector ``(obt, r, s, cb, jp)`` holds, in field ``f``,
        the code of output channel ``((obt*JP + jp)*F + f)*VL + lane`` (within its
        group) at reduction index ``cb*4 + q``."""
        g = Geometry.of(op)
        lay = self.layout(op)
        vl, bs = self.mode.vl, store_bits(op.w_bit)
        w = np.asarray(w).astype(np.int64)
        check_weights(w, op)
        w4 = w.T.reshape(g.o, g.c, 1, 1) if g.matmul else w  # [O, Cg, KH, KW]
        wg = w4.reshape(g.groups, g.og, g.cg, g.kh, g.kw)
        s, z = codes(op)
        u = (wg + z) // s
        full = np.zeros((g.groups, lay["ogp"], lay["cgp"], g.kh, g.kw), np.int64)
        full[:, : g.og, : g.cg] = u
        t = full.reshape(g.groups, lay["obt"], lay["JP"], lay["F"], vl, lay["cb"], KV, g.kh, g.kw)
        t = t.transpose(0, 1, 7, 8, 5, 2, 3, 4, 6)  # [G, OBT, KH, KW, CB, JP, F, VL, KV]
        shifts = (bs * np.arange(lay["F"], dtype=np.int64))[:, None, None]
        packed = (t << shifts).sum(axis=6)
        wp = np.ascontiguousarray(packed.reshape(g.groups, lay["obt"], g.kh, g.kw, lay["cb"], lay["JP"], vl * KV))
        corr = np.zeros((g.groups, lay["ogp"]), np.int64)
        corr[:, : g.og] = act_offset(op) * wg.sum(axis=(2, 3, 4))
        return [wp.astype(np.uint8), corr.astype(np.int32)]

    def unpack(self, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        """Inverse of :meth:`pack`: the op's weights in their original shape."""
        g = Geometry.of(op)
        lay = self.layout(op)
        vl, bs = self.mode.vl, store_bits(op.w_bit)
        wp = np.asarray(packed[0]).astype(np.int64)
        t = wp.reshape(g.groups, lay["obt"], g.kh, g.kw, lay["cb"], lay["JP"], 1, vl, KV)
        shifts = (bs * np.arange(lay["F"], dtype=np.int64))[:, None, None]
        u = (t >> shifts) & ((1 << bs) - 1)  # [G, OBT, KH, KW, CB, JP, F, VL, KV]
        full = u.transpose(0, 1, 5, 6, 7, 4, 8, 2, 3).reshape(g.groups, lay["ogp"], lay["cgp"], g.kh, g.kw)
        s, z = codes(op)
        wg = s * full[:, : g.og, : g.cg] - z
        w4 = wg.reshape(g.o, g.cg, g.kh, g.kw)
        return w4.reshape(g.o, g.c).T if g.matmul else w4

    def reference(self, x, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        return reference(x, self.unpack(packed, op), op)

    # ---- kernel ------------------------------------------------------------------------------
    def primfunc(self, op: QOp, target=None):
        if target is not None and not self._target_ok(target):
            raise ValueError(f"{self.name} cannot compile for {target} (needs {self.need})")
        from ._lowbit_tir import build

        knobs = self.knobs(op)
        func = build(op, Geometry.of(op), self.mode, self.layout(op), knobs, fields(op, self.mode), codes(op),
                     act_offset(op))
        tagged = op.with_(family=self.name, knobs=knobs)
        return func.with_attr("soniq.qop", tagged.to_json()).with_attr("tirx.is_scheduled", True)


# Rates on the scale of Int8DotFamily.macs_per_cycle (one unit ~ 87 MACs of the VNNI
# int8-dot conv), fitted to benchmarks/kernels.py on the 2-core znver5 dev host
# (interleaved runs, ratios to x86-avx512-vnni): "macs" from the 3x3 conv (2- and 4-bit
# zmm: 1.01x the VNNI time, ymm AVX-VNNI 1.84x, AVX2 2.8x), "macs_r1" from the 1-bit
# 4096^2 GEMV (compute-bound), "bytes" from the 4-bit GEMV (stream-bound: zmm 0.58x
# the int8 VNNI GEMV for half its bytes), "macs_mm" from the 16 x 4096^2 GEMM and the
# 128 x 256 x 1024 BERT FFN (zmm 0.63x and 0.99-1.16x the VNNI time). The ymm rates
# are set against x86-avx2-dot's model, their competitor on hosts without AVX-512:
# AVX-VNNI 0.52-0.69x its time; AVX2 0.88x on the long GEMM but 1.2-1.6x on the FFN,
# so x86-avx2-dot keeps the multi-row matmuls and the AVX2 low-bit kernel the GEMVs.
AVX512_LOWBIT = LowbitFamily("x86-avx512-lowbit", "vnni512", ["avx512f", "avx512bw", "avx512vnni"],
                             {"macs": 86.0, "macs_r1": 73.0, "macs_mm": 110.0, "bytes": 14.4})
AVXVNNI_LOWBIT = LowbitFamily("x86-avxvnni-lowbit", "vnni256", ["avx2", "avxvnni"],
                              {"macs": 47.0, "macs_r1": 37.0, "macs_mm": 80.0, "bytes": 11.0})
AVX2_LOWBIT = LowbitFamily("x86-avx2-lowbit", "madd256", ["avx2"],
                           {"macs": 31.0, "macs_r1": 19.0, "macs_mm": 30.0, "bytes": 10.0})
