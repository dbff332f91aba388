"""Exact integer Winograd F(2x2, 3x3) for low-bit 3x3 convolutions.

A 3x3 stride-1 convolution computes each 2x2 output tile from a 4x4 input tile
with 16 multiplies per input channel instead of 36 (2.25x fewer):

    Y = A^T [ (G g G^T) . (B^T d B) ] A            (. : elementwise, per channel, summed)

With ``G`` replaced by ``2G`` (``G`` holds halves) every matrix is an integer one:

* ``V = B^T d B`` (``B`` holds 0, +-1) turns an activation tile ``d`` (codes minus the
  zero point) into sums of four +-d: for <= 4-bit codes within ``[-30, 60]``;
* ``U = (2G) g (2G)^T = 4 G g G^T`` turns a weight kernel ``g`` into sums of up to 9
  weights: for signed <= 4-bit weights within ``[-72, 72]``, an s8;
* ``A^T M A`` (``A`` holds 0, +-1) of ``M = sum_c U . V`` equals ``4 Y``: the shift by 2
  at the end is an exact division.

So the 16 reductions over input channels run on the int8 dot-product instructions:
``V + off`` (``off = -min V``) is the u8 operand, ``U`` the s8 one, and the shift's
correction ``off * sum_c U`` is a per-(position, output channel) constant computed at
pack time. Every bound is computed per op from its activation range and weight width
(:func:`bounds`); the family refuses an op whose transformed operands would leave
u8 / s8, or whose ``vpmaddubsw`` pair sums could saturate int16 (AVX2).

The kernel (``_winograd_tir.py``), three stages in one PrimFunc:

1. **Input transform**: the codes are re-laid out channels last into a padded
   plane (words of 4 channels, built from one load per channel plane and 16 or 8
   pixels; the padding and the padding channels hold the zero point), then for
   each tile and 16 to 64 channels the 16 transformed values are computed in
   wrapping byte arithmetic on raw codes: ``V + off`` lies in u8, so its residue
   mod 256 is the value itself; the zero point's share (``z * B^T 1 B``, non-zero only
   at position ``[1][1]``, where it is ``4 z``) is folded into that entry's shift.
   They land as ``vt[n, e, t, q]`` (position ``e``, tile ``t``, channel word ``q``).
2. **Batched dot products**: a task takes the tiles of one or more rows of tiles
   (enough for a vector of output pixels) and ``J`` vectors of output channels; for
   each micro-tile of ``R`` tiles of a row and each of the 16 positions it runs the
   int8-dot micro-kernel (a broadcast word of 4 channels of a tile against ``J``
   weight vectors) over the channel words, into a task-local ``M`` block.
3. **Output transform**: ``A^T M A`` on whole vectors of output channels, the
   correction subtracted first, the shift; the 2x2 pixels go to a channels-last row
   buffer (one vector store per pixel), written to NCHW with the int8-dot kernel's
   register transposes (one vector store per channel and 16 or 8 pixels).

Modes: AVX-512 VNNI ``vpdpbusd`` and AVX2 ``vpmaddubsw`` + ``vpmaddwd`` (the int8-dot
family's instruction sequences). The numpy twin of the arithmetic is
:func:`winograd_reference`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from soniq_tvm.qop import QOp, check_weights, reference, weight_range

from . import _isa
from .int8dot import MODES, Geometry, Mode, _act_range, _dot

__all__ = ["WinogradFamily", "AVX512_WINOGRAD", "AVX2_WINOGRAD", "bounds", "winograd_reference",
           "transform_weights", "BT", "G2", "AT"]

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.int64)  # V = BT d BT^T
G2 = np.array([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]], np.int64)  # U = G2 g G2^T (= 4 G g G^T)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.int64)  # 4Y = AT M AT^T

_U8, _S8, _S16 = (0, 255), (-128, 127), (-32768, 32767)


def _range_of(mat: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Range of ``mat x mat^T`` entries over inputs in ``[lo, hi]`` (each entry a
    signed sum of inputs)."""
    coef = np.einsum("ia,jb->ijab", mat, mat).reshape(mat.shape[0] ** 2, -1)
    mins = np.minimum(coef * lo, coef * hi).sum(axis=1)
    maxs = np.maximum(coef * lo, coef * hi).sum(axis=1)
    return int(mins.min()), int(maxs.max())


def act_codes_range(op: QOp) -> tuple[int, int]:
    """Range of ``code - zero point`` (0 included: the padding)."""
    lo, hi = _act_range(op)
    return min(lo - op.a_zero, 0), max(hi - op.a_zero, 0)


def bounds(op: QOp) -> dict:
    """The transformed operands' ranges for ``op``'s widths: ``v`` (of ``B^T d B``),
    ``off`` (the shift into u8), ``u`` (of ``G2 g G2^T``) and ``pair`` (the largest
    magnitude of one ``vpmaddubsw`` pair sum, u8 x s8 twice)."""
    v = _range_of(BT, *act_codes_range(op))
    u = _range_of(G2, *weight_range(op.w_bit, op.w_signed))
    off = -v[0]
    vmax = v[1] + off
    return {"v": v, "off": off, "u": u, "pair": 2 * vmax * max(-u[0], u[1])}


def exact_for(op: QOp, mode: Mode) -> str | None:
    """None when the transformed operands fit ``mode``'s instructions exactly, else why not."""
    b = bounds(op)
    if b["v"][1] + b["off"] > _U8[1]:
        return f"transformed activations span {b['v']}, wider than u8"
    if not (_S8[0] <= b["u"][0] and b["u"][1] <= _S8[1]):
        return f"transformed weights span {b['u']}, beyond s8"
    if mode.name == "avx2-madd" and b["pair"] > _S16[1]:
        return f"vpmaddubsw pair sums reach {b['pair']}, beyond int16"
    return None


def transform_weights(w: np.ndarray) -> np.ndarray:
    """``U[o, c, e] = (G2 g G2^T)[e // 4, e % 4]`` for weights ``w[O, C, 3, 3]``."""
    # two float32 products (one BLAS call each): |u| <= 16 * 2^8, exact in float32
    g = G2.astype(np.float32)
    t = np.asarray(w, np.float32).reshape(-1, 3) @ g.T  # [O*C*3(a), 4(j)]: g G2^T
    t = t.reshape(w.shape[0] * w.shape[1], 3, 4).transpose(0, 2, 1).reshape(-1, 3) @ g.T  # [O*C*4(j), 4(i)]
    u = t.reshape(w.shape[0], w.shape[1], 4, 4).transpose(0, 1, 3, 2)  # [O, C, i, j]
    return np.rint(u).astype(np.int32).reshape(w.shape[0], w.shape[1], 16)


def untransform_weights(u: np.ndarray) -> np.ndarray:
    """Inverse of :func:`transform_weights`: ``L G2 = 4 I`` for ``L`` below (rows 0 and 3
    of ``G2`` are ``2 e_0`` and ``2 e_2``, row 1 minus row 2 is ``2 e_1``), so
    ``L U L^T = 16 g``."""
    u = np.asarray(u, np.int64).reshape(u.shape[0], u.shape[1], 4, 4)
    left = np.array([[2, 0, 0, 0], [0, 2, -2, 0], [0, 0, 0, 2]], np.int64)
    g16 = np.einsum("ia,ocab,jb->ocij", left, u, left)  # 16 g
    if (g16 % 16).any():
        raise ValueError("not a transformed 3x3 kernel")
    return g16 // 16


def winograd_reference(x: np.ndarray, w: np.ndarray, op: QOp) -> np.ndarray:
    """The kernel's arithmetic in numpy (int64): tiles, the three transforms, the
    exact shift. Equals :func:`soniq_tvm.qop.reference` for every op the family takes."""
    g = Geometry.of(op)
    ty, tx = math.ceil(g.oh / 2), math.ceil(g.ow / 2)
    pt, pl, _, _ = g.padding
    d = np.zeros((g.n, g.c, 2 * ty + 2, 2 * tx + 2), np.int64)
    h, wd = min(g.h, 2 * ty + 2 - pt), min(g.w, 2 * tx + 2 - pl)
    d[:, :, pt:pt + h, pl:pl + wd] = np.asarray(x, np.int64)[:, :, :h, :wd] - op.a_zero
    tiles = np.lib.stride_tricks.sliding_window_view(d, (4, 4), axis=(2, 3))[:, :, ::2, ::2]  # n c ty tx 4 4
    v = np.einsum("ia,nctxab,jb->nctxij", BT, tiles, BT).reshape(g.n, g.c, ty, tx, 16)
    u = transform_weights(w)  # o c e
    m = np.einsum("nctxe,oce->notxe", v, u).reshape(g.n, g.o, ty, tx, 4, 4)
    y4 = np.einsum("ia,notxab,jb->notxij", AT, m, AT)
    assert not (y4 % 4).any()
    y = (y4 // 4).transpose(0, 1, 2, 4, 3, 5).reshape(g.n, g.o, 2 * ty, 2 * tx)
    return y[:, :, : g.oh, : g.ow]


# tiles of a full micro-tile, by (vector lanes, J): 24 (12) of 32 (16) registers hold
# accumulators with J = 2, 28 (14) with J = 1
_R_FULL = {(16, 2): 12, (8, 2): 4, (16, 1): 14, (8, 1): 6}


def _micro_r(tpt: int, vl: int, j: int = 2) -> int:
    """The default micro-tile: at most the full one, all of a task's of one size."""
    return math.ceil(tpt / math.ceil(tpt / _R_FULL[vl, j]))


def _rows_per_task(ty: int, tx: int, ow: int, vl: int) -> int:
    """Rows of tiles per task: at least enough output pixels for a vector store per
    channel (2 rows of pixels per row of tiles); among those, the count that computes
    the fewest tiles (a short last task recomputes some of its neighbour's) with
    micro-tiles near full (below 8 tiles, each one less costs ~5 %), the fewest rows
    on a tie (more tasks)."""
    best = None
    for rt in range(max(1, min(ty, math.ceil(vl / (2 * ow)))), ty + 1):
        tpt = rt * tx
        r = _micro_r(tpt, vl)
        full, last = divmod(ty, rt)
        computed = full * math.ceil(tpt / r) * r + (math.ceil(last * tx / r) * r if last else 0)
        score = computed * (1 + 0.05 * max(0, 8 - r))
        if best is None or score < best[0] - 1e-9:
            best = (score, rt)
    return best[1]


class WinogradFamily:
    """Integer Winograd F(2x2, 3x3) on one ISA's dot-product instructions.

    Knobs: ``R`` tiles per micro-tile, ``J`` accumulator vectors of output channels.
    """

    def __init__(self, name: str, mode: str, need: Sequence[str], macs_per_cycle: float, stream_bytes: float,
                 transform_cost: float, cache_bytes: int = 1 << 20, cold_bytes: float = 5.6):
        self.name = name
        self.mode_name = mode
        self.need = tuple(need)
        self.macs_per_cycle = macs_per_cycle
        self.stream_bytes = stream_bytes
        self.transform_cost = transform_cost
        self.cache_bytes = cache_bytes
        self.cold_bytes = cold_bytes

    @property
    def mode(self) -> Mode:
        return MODES[self.mode_name]

    def _target_ok(self, target) -> bool:
        return (target is not None and target.kind.name == "llvm" and _isa.is_x86(target)
                and all(f in _isa.features(target) for f in self.need))

    def refusal(self, op: QOp, target=None) -> str | None:
        """Why this family does not take ``op`` (None: it does)."""
        if target is not None and not self._target_ok(target):
            return f"target lacks {self.need}"
        if op.kind != "conv2d" or not op.uniform:
            return "not a uniform conv2d"
        if op.a_dtype not in ("int8", "uint8") or op.a_bit > 8 or op.w_bit > 8:
            return "codes wider than 8 bits"
        lo, hi = _act_range(op)
        if not lo <= op.a_zero <= hi:
            return "zero point outside the code range"
        g = Geometry.of(op)
        if (g.kh, g.kw) != (3, 3) or g.strides != (1, 1) or g.dilation != (1, 1) or g.groups != 1:
            return "not a 3x3 stride-1 dense conv"
        if g.oh < 1 or g.ow < 1:
            return "empty output"
        return exact_for(op, self.mode)

    def accepts(self, op: QOp, target) -> bool:
        return self.refusal(op, target) is None

    def cost(self, op: QOp, target) -> float | None:
        """The int8-dot families' units: the larger of the 16 reductions' padded MACs at
        the fitted rate and the transformed weights streamed (16/9 of the direct
        ones), plus the two transforms per tile and channel, plus the transformed
        weights beyond ``cache_bytes`` at ``cold_bytes`` a unit: inside a model a
        kernel's weights arrive cold, and a kernel that reads each of them for few
        tiles (the 7x7 convs: 16 tiles, 3 MB of transformed weights for 384 -> 512
        channels) waits for them: measured in ResNet-18, 170-280 us against 112 us for
        the same kernel timed alone."""
        if not self.accepts(op, target):
            return None
        lay = self.layout(op)
        tiles = Geometry.of(op).n * lay["tiles"]
        macs = tiles * 16 * lay["op"] * lay["cp"]
        weights = 16 * lay["op"] * lay["cp"]
        transforms = tiles * (lay["cp"] + lay["op"]) * self.transform_cost
        cold = max(0, weights - self.cache_bytes) / self.cold_bytes
        return float(max(macs / self.macs_per_cycle, weights / self.stream_bytes) + transforms + cold)

    # ---- layout and knobs ------------------------------------------------------
    def layout(self, op: QOp) -> dict:
        g = Geometry.of(op)
        m = self.mode
        ty, tx = math.ceil(g.oh / 2), math.ceil(g.ow / 2)
        cb = math.ceil(g.c / m.kv)
        ob = math.ceil(g.o / m.vl)
        rt = _rows_per_task(ty, tx, g.ow, m.vl)
        return {"ty": ty, "tx": tx, "tiles": ty * tx, "cb": cb, "cp": cb * m.kv, "ob": ob, "op": ob * m.vl,
                "rt": rt, "tpt": rt * tx}

    def knob_space(self, op: QOp, target=None) -> dict[str, list]:
        lay = self.layout(op)
        js = [j for j in (1, 2, 4) if lay["ob"] % j == 0]
        rs = [r for r in (2, 4, 6, 8, 12, 14, 16) if r <= lay["tpt"]] or [lay["tpt"]]
        return {"R": rs, "J": js}

    def default_knobs(self, op: QOp) -> dict:
        lay = self.layout(op)
        j = 2 if lay["ob"] % 2 == 0 else 1
        return {"R": _micro_r(lay["tpt"], self.mode.vl, j), "J": j}

    def knobs(self, op: QOp) -> dict:
        k = self.default_knobs(op)
        k.update({key: int(v) for key, v in (op.knobs or {}).items() if key in ("R", "J")})
        lay = self.layout(op)
        if not (1 <= k["R"] <= lay["tpt"] and k["J"] >= 1 and lay["ob"] % k["J"] == 0):
            raise ValueError(f"{self.name}: knobs {k} invalid for {op.layer} ({lay['tpt']} tiles a task, "
                             f"{lay['ob']} channel blocks)")
        if (k["R"] + 1) // 2 * k["J"] * self.mode.vl * 4 >= 1024:
            raise ValueError(f"{self.name}: tile R={k['R']} J={k['J']} exceeds the 1 KiB register buffers")
        return k

    # ---- packing ------------------------------------------------------------------
    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]:
        """``[wp[16, Ob/J, Cb, J, VL * kv] (s8), corr[4, Op] (int32)]``: the transformed weights,
        and the shift's share of each output pixel of a tile (times 4)."""
        w = np.asarray(w)
        check_weights(w, op)
        g, m, lay = Geometry.of(op), self.mode, self.layout(op)
        j = self.knobs(op)["J"]
        full = np.zeros((lay["op"], lay["cp"], 16), np.int8)  # s8 by the family's bounds
        full[: g.o, : g.c] = transform_weights(w)
        # [Obt, J, VL, Cb, kv, 16] -> [16, Obt, Cb, J, VL, kv]
        t = full.reshape(lay["ob"] // j, j, m.vl, lay["cb"], m.kv, 16).transpose(5, 0, 3, 1, 2, 4)
        wp = np.ascontiguousarray(t.reshape(16, lay["ob"] // j, lay["cb"], j, m.vl * m.kv))
        # the shift's share of M, off * sum_c U, through the output transform: [4, Op]
        shift = (bounds(op)["off"] * full.sum(axis=1, dtype=np.int64)).reshape(lay["op"], 4, 4)
        corr = np.einsum("ia,oab,jb->ijo", AT, shift, AT).reshape(4, lay["op"]).astype(np.int32)
        return [wp, np.ascontiguousarray(corr)]

    def unpack(self, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        g, m, lay = Geometry.of(op), self.mode, self.layout(op)
        j = self.knobs(op)["J"]
        wp = np.asarray(packed[0]).astype(np.int64)
        t = wp.reshape(16, lay["ob"] // j, lay["cb"], j, m.vl, m.kv).transpose(1, 3, 4, 2, 5, 0)
        u = t.reshape(lay["op"], lay["cp"], 16)[: g.o, : g.c]
        return untransform_weights(u)

    def reference(self, x, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        return reference(x, self.unpack(packed, op), op)

    # ---- kernel ----------------------------------------------------------------------
    def primfunc(self, op: QOp, target=None):
        why = self.refusal(op, target)
        if why is not None:
            raise ValueError(f"{self.name} cannot compute {op.layer}: {why}")
        from ._winograd_tir import build

        knobs = self.knobs(op)
        func = build(op, Geometry.of(op), self.mode, self.layout(op), knobs, _dot, bounds(op)["off"])
        tagged = op.with_(family=self.name, knobs=knobs)
        return func.with_attr("soniq.qop", tagged.to_json()).with_attr("tirx.is_scheduled", True)


# Rates on the int8-dot families' scale, fitted to the kernel's times on ResNet-18's
# low-bit 3x3 groups (48 -> 64 channels at 56x56 to 384 -> 512 at 7x7, 2 and 4 bits,
# 2 threads, untuned; ``benchmarks.kernels --sections winograd``, Sapphire Rapids
# host), the input transform on channel bytes and the output through the row buffer.
# VNNI: ~76 MACs a unit in the reductions and ~3 units per tile and channel for the
# transforms: 1.27x the int8-dot kernel's speed at 56x56, 1.35x at 28x28, 1.22x at
# 14x14, 1.07x at 7x7. AVX2 (a haswell build on the same host): ~36 MACs a unit,
# ~7.5 units per tile and channel: 1.25x at 56x56, 1.56-1.73x below. Both pay for
# cold transformed weights beyond 1 MiB (see ``WinogradFamily.cost``).
AVX512_WINOGRAD = WinogradFamily("x86-avx512-winograd", "avx512-vnni", ["avx512f", "avx512bw", "avx512vnni"],
                                 macs_per_cycle=76.0, stream_bytes=17.0, transform_cost=3.0)
AVX2_WINOGRAD = WinogradFamily("x86-avx2-winograd", "avx2-madd", ["avx2"], macs_per_cycle=36.0, stream_bytes=9.0,
                               transform_cost=7.5)
