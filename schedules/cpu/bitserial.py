"""Bit-serial family: AND + popcount over bit-planes, for low x low bit widths.

With the activations shifted to unsigned codes ``xc = x + off`` (``off = 2**(a-1)``
for signed activations, else 0) split into planes ``xc = sum_i 2**i a_i`` and the
weights written as planes with coefficients ``w = sum_j coef_j p_j``:

* signed ``b >= 2`` bits: two's complement, ``coef = 1, 2, ..., -2**(b-1)``;
* unsigned: ``coef = 1, 2, ..., 2**(b-1)``;
* bipolar 1-bit ``w = 2 p_0 - 1``: ``coef = 2`` and a per-pixel ``-sum_k xc_k``
  (the popcount of the activation planes alone, shared by all output channels),

the dot product is ``sum_ij 2**i coef_j popcount(a_i & p_j) - off * sum_k w_k``,
exact in int64 lanes. Popcounts are computed as signed int64 *before* scaling
and summing (TVM emits unsigned subtraction with ``nuw``; see the field guide).

Layout: the reduction of one tap (a group's ``Cg`` channels) is packed into
``CW = ceil(Cg / 64)`` uint64 words. Weights ``wb[G, Ob, KH, KW, CW, NP, VL]``
(``VL`` output channels per vector, ``NP`` planes) are packed at compile time;
activations ``xb[N, Hp, Wp, G*CW, A]`` by the kernel at run time (channel padding
is 0 in every plane, spatial padding holds the code of 0, i.e. ``off``). The tile
is the int8-dot one: ``R`` pixels x ``J`` vectors of output channels, parallel
over (n, group, output row, channel tile). LLVM lowers the vector popcount to
``vpopcntq`` (AVX512-VPOPCNTDQ), a ``vpshufb`` nibble table (AVX2) or ``cnt`` +
pairwise adds (NEON).

**Pixel lanes** (knob ``lanes="px"``, the default on AVX512-VPOPCNTDQ for stride-1
convs at least 8 wide): a vector holds the activation words of 8 adjacent output
pixels (one load from ``xb``, whose pixels are innermost) and is ANDed with one
broadcast weight word per output channel (``vpandq mem{1to8}``); a task owns ``C``
output channels (the weights' last axis is then ``C`` instead of ``VL``), and the
write-back is one vector store per channel and 8 pixels instead of scalar stores.
The last tile of a row overlaps the one before it, as in the channel-lane tile.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from soniq_tvm.qop import QOp, check_weights, reference

from . import _isa
from .int8dot import Geometry, _divisors

__all__ = ["BitSerialFamily", "BITSERIAL", "weight_planes"]


def weight_planes(op: QOp) -> list[int]:
    """Coefficients of the packed weight planes. Bipolar ``w = 2 p_0 - 1``: one plane
    with coefficient 2; the ``-1`` term, ``-sum_k xc_k = -sum_i 2**i popcount(a_i)``,
    does not depend on the output channel and is computed once per pixel."""
    b = op.w_bit
    if op.bipolar:
        return [2]
    if op.w_signed:
        return [1 << j for j in range(b - 1)] + [-(1 << (b - 1))]
    return [1 << j for j in range(b)]


def act_offset(op: QOp) -> int:
    return (1 << (op.a_bit - 1)) if op.a_signed else 0


class BitSerialFamily:
    """Bit-serial popcount kernels (any LLVM CPU target; fastest with vpopcntq).

    Knobs: ``lanes`` (``"oc"`` channel lanes, the default, or ``"px"`` pixel lanes
    with ``C`` output channels per task); for channel lanes ``vl`` uint64 lanes per
    vector (2, 4, 8: 128/256/512-bit), ``R`` pixels per tile, ``J`` vectors of
    output channels per tile.
    """

    name = "cpu-bitserial"
    max_bits = 4  # beyond this the plane count makes it lose to the dot families

    def _lanes(self, op: QOp) -> int:
        """uint64 lanes per vector: a knob (``vl``, default 4 = 256 bits) rather than a
        target property, because ``pack`` sees only the op (the pack phase sets it from
        :meth:`target_knobs`)."""
        k = op.knobs or {}
        if k.get("lanes") == "px":
            return int(k.get("C", 8))  # pixel lanes: the weight layout's last axis is C channels
        return int(k.get("vl", 4))

    @staticmethod
    def _px_ok(op: QOp) -> bool:
        """Pixel lanes need a stride-1 conv at least one vector (8 pixels) wide."""
        g = Geometry.of(op)
        return not g.matmul and g.strides[1] == 1 and g.ow >= 8

    @staticmethod
    def _zmm(target) -> bool:
        if target is None or target.kind.name != "llvm":
            return False
        f = _isa.features(target)
        return _isa.is_x86(target) and {"avx512f", "avx512bw", "avx512vpopcntdq"} <= set(f)

    def target_knobs(self, op: QOp, target) -> dict:
        """Knobs the target decides, set by the pack phase before packing (a tuned or
        given knob wins). With AVX512-VPOPCNTDQ: 512-bit vectors (``vpopcntq zmm``).
        Stride-1 convs at least 8 wide take **pixel lanes** (``lanes="px"``: a
        vector holds the activation words of 8 output pixels, ANDed with one
        broadcast weight word per output channel; ``C = 8`` channels per task, and
        the write-back is one vector store per channel and 8 pixels); the rest take
        channel lanes with small tiles (R = 4 pixels by J = 2 vectors of 8 channels
        on images at least 28 wide, J = 1 below), which ran 1.3-2.2x faster than
        256-bit vectors on ResNet-18's 3x3 shapes at 1x1 and 2x2 bits."""
        if not self._zmm(target):
            return {}
        g = Geometry.of(op)
        if self._px_ok(op):
            return {"lanes": "px", "C": 8}
        ob = math.ceil(g.og / 8)
        j = 2 if g.ow >= 28 and ob % 2 == 0 else 1
        return {"vl": 8, "R": min(4, g.ow), "J": j}

    # bit-MACs per unit time, on the scale of Int8DotFamily.macs_per_cycle (from the
    # 1x1-bit 3x3-conv benchmark in benchmarks/kernels.py). Pixel lanes on
    # VPOPCNTDQ: 400 (64 -> 64 channels at 56 x 56, 1x1 bits: 36 us against ~140 us
    # for the VNNI kernel at 8 bits); refit on ResNet-18 {1,4}, where the two more
    # layers this splits ran the model 7-9% faster (paired, three runs). AVX2: 100,
    # refit on an AVX2-only host (Zen 3), where it moves ResNet-18 {1,4}'s 1 x 1-bit
    # groups at 56 x 56 to 14 x 14 from integer Winograd to this family: the model ran
    # 0.95x and 0.94x (paired, rates 100 and 140 flip the same 10 groups; 66 came from
    # haswell builds on an AVX-512 host).
    def _rate(self, target, px: bool = False) -> float:
        f = _isa.features(target)
        if "avx512vpopcntdq" in f and "avx512vl" in f:
            return 400.0 if px else 200.0
        if _isa.is_x86(target) and "avx2" in f:
            return 100.0
        if _isa.is_aarch64(target):
            return 48.0
        return 16.0

    def accepts(self, op: QOp, target) -> bool:
        if op.a_zero or not op.uniform or target is None or target.kind.name != "llvm":
            return False
        if op.a_dtype not in ("int8", "uint8"):
            return False
        if not (_isa.is_x86(target) or _isa.is_aarch64(target)):
            return False
        g = Geometry.of(op)
        if not g.matmul and g.cg == 1 and g.groups > 1:
            return False
        return op.w_bit <= self.max_bits and op.a_bit <= self.max_bits

    def cost(self, op: QOp, target) -> float | None:
        if not self.accepts(op, target):
            return None
        g = Geometry.of(op)
        from ..registry import with_target_knobs

        op = with_target_knobs(self, op, target)  # the kernel the pack phase would build
        vl = self._lanes(op)
        px = op.knobs.get("lanes") == "px"
        ogp = math.ceil(g.og / vl) * vl
        cwp = math.ceil(g.cg / 64) * 64
        bitmacs = g.n * g.groups * ogp * g.oh * g.ow * g.kh * g.kw * cwp * op.a_bit * len(weight_planes(op))
        relayout = g.n * (g.h + 2) * (g.w + 2) * g.c * op.a_bit / 4.0
        return float(bitmacs / self._rate(target, px) + relayout + 2.0 * np.prod(op.out_shape))

    # ---- layout and knobs ----------------------------------------------------------
    def layout(self, op: QOp) -> dict:
        g = Geometry.of(op)
        vl = self._lanes(op)
        ob = math.ceil(g.og / vl)
        return {"vl": vl, "ob": ob, "ogp": ob * vl, "cw": math.ceil(g.cg / 64), "np": len(weight_planes(op))}

    def knob_space(self, op: QOp, target=None) -> dict[str, list]:
        g = Geometry.of(op)
        lay = self.layout(op)
        space = {"vl": [2, 4, 8], "R": [r for r in range(1, 9) if r <= g.ow and r * lay["vl"] * 8 < 1024],
                 "J": [j for j in _divisors(lay["ob"]) if j <= 8 and j * lay["vl"] * 8 < 1024]}
        if self._px_ok(op):
            space.update(lanes=["oc", "px"], C=[4, 8, 12])
        return space

    def knobs(self, op: QOp) -> dict:
        g = Geometry.of(op)
        lay = self.layout(op)
        if (op.knobs or {}).get("lanes") == "px":
            c = lay["vl"]
            if not self._px_ok(op) or not 1 <= c <= 15:
                raise ValueError(f"{self.name}: pixel lanes need a stride-1 conv at least 8 wide and 1 <= C <= 15 "
                                 f"channels per task, not C={c} on {op.layer} (stride {g.strides}, ow={g.ow})")
            return {"lanes": "px", "C": c, "R": 8, "J": 1}
        regs = 32 if lay["vl"] == 8 else 16
        best = None
        for j in (j for j in _divisors(lay["ob"]) if j <= 8):
            for r in range(1, min(8, g.ow) + 1):
                if r * j + j * lay["np"] + 4 > regs or r * j * lay["vl"] * 8 >= 1024:
                    continue
                waste = math.ceil(g.ow / r) * r / g.ow
                score = (r * j) / (r + j) / waste
                if best is None or score > best[0] + 1e-9:
                    best = (score, r, j)
        k = {"vl": lay["vl"], "R": best[1], "J": best[2]}
        k.update({key: v for key, v in (op.knobs or {}).items() if key in ("R", "J")})
        if not (1 <= k["R"] <= g.ow) or lay["ob"] % k["J"] or k["R"] * k["J"] * lay["vl"] * 8 >= 1024:
            raise ValueError(f"{self.name}: knobs {k} invalid for {op.layer}")
        return k

    # ---- packing ----------------------------------------------------------------------
    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]:
        lay = self.layout(op)
        g = Geometry.of(op)
        w = np.asarray(w).astype(np.int64)
        check_weights(w, op)
        w4 = w.T.reshape(g.o, g.c, 1, 1) if g.matmul else w
        wg = w4.reshape(g.groups, g.og, g.cg, g.kh, g.kw)
        if op.bipolar:
            planes = [(wg + 1) // 2]
        else:
            code = wg & ((1 << op.w_bit) - 1)
            planes = [(code >> j) & 1 for j in range(op.w_bit)]
        vl, cw = lay["vl"], lay["cw"]
        bits = np.zeros((g.groups, lay["ogp"], g.kh, g.kw, lay["np"], cw * 64), np.uint8)
        for j, p in enumerate(planes):
            bits[:, : g.og, :, :, j, : g.cg] = p.transpose(0, 1, 3, 4, 2)
        # word bit i = channel i of its 64: little-endian bits in little-endian bytes
        words = np.packbits(bits, axis=-1, bitorder="little").view("<u8").astype(np.uint64)
        words = words.transpose(0, 1, 2, 3, 5, 4)  # [G, Ogp, KH, KW, CW, NP]
        # [G, Ogp, KH, KW, CW, NP] -> [G, Ob, KH, KW, CW, NP, VL]
        wb = words.reshape(g.groups, lay["ob"], vl, g.kh, g.kw, cw, lay["np"]).transpose(0, 1, 3, 4, 5, 6, 2)
        corr = np.zeros((g.groups, lay["ogp"]), np.int64)
        corr[:, : g.og] = act_offset(op) * wg.sum(axis=(2, 3, 4))
        return [np.ascontiguousarray(wb), corr.astype(np.int32)]

    def unpack(self, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        g = Geometry.of(op)
        wb = np.asarray(packed[0])
        gg, ob, kh, kw, cw, npl, vl = wb.shape
        words = wb.transpose(0, 1, 6, 2, 3, 4, 5).reshape(gg, ob * vl, kh, kw, cw, npl)
        bits = ((words[..., None, :] >> np.arange(64, dtype=np.uint64)[:, None]) & np.uint64(1)).astype(np.int64)
        bits = bits.reshape(gg, ob * vl, kh, kw, cw * 64, npl)[:, : g.og, :, :, : g.cg]
        coefs = np.array(weight_planes(op), np.int64)
        wg = (bits * coefs).sum(axis=-1).transpose(0, 1, 4, 2, 3)  # [G, Og, Cg, KH, KW]
        if op.bipolar:
            wg = wg - 1
        w4 = wg.reshape(g.o, g.cg, g.kh, g.kw)
        return w4.reshape(g.o, g.c).T if g.matmul else w4

    def reference(self, x, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        return reference(x, self.unpack(packed, op), op)

    # ---- kernel -----------------------------------------------------------------------
    def primfunc(self, op: QOp, target=None):
        from ._bitserial_tir import build

        knobs = self.knobs(op)
        lay = self.layout(op)
        func = build(op, Geometry.of(op), lay, knobs, weight_planes(op), act_offset(op))
        tagged = op.with_(family=self.name, knobs=knobs)
        return func.with_attr("soniq.qop", tagged.to_json()).with_attr("tirx.is_scheduled", True)


BITSERIAL = BitSerialFamily()
