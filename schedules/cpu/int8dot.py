"""int8-class dot-product families: AVX2 ``vpmaddubsw``, AVX-512 VNNI ``vpdpbusd``,
ARM NEON ``sdot``.

One kernel skeleton serves conv2d and matmul. A matmul ``x[M, K] @ w[K, N]`` is
the 1x1 conv of a one-row image of ``M`` pixels, so both run the same
micro-kernel:

* **Activations** are re-laid out by the kernel itself (at run time) into
  ``xs[N, Hp, Wp, G * Cgp]``: zero-padded spatially, channels last, each group's
  ``Cg`` channels padded to ``Cgp`` (a multiple of ``kv``, the reduction width of one
  instruction lane) and shifted into the instruction's operand domain,
  ``xs = x + off`` (see *Exactness*). One 32-bit word holds the ``kv`` channels of
  a pixel; the words of 16 (8) pixels are built from ``kv`` channel-plane loads,
  and blocks of 16 x 16 (8 x 8) words are transposed in registers so that each
  pixel is one vector store (narrow images and few channels: strided word
  stores). Only the padding border is filled. A strided 1x1 conv without padding
  gathers just the pixels it reads (``xs`` is ``OH x OW``; the downsample convs of
  a ResNet read a quarter of their input) and runs at stride 1. A matmul with
  unsigned activations that already fit the operand reads ``x`` in place.
* **Weights** are packed at compile time into
  ``wp[G, Ob/J, KH, KW, Cb, J, VL * kv]``: for output-channel block ``ob`` (``VL``
  channels, one accumulator vector) and reduction step ``cb`` the ``VL x kv``
  weights are one vector load, and the ``J`` of one tile are adjacent (one
  sequential stream per task). Padded channels hold 0.
* **Micro-kernel**: a tile of ``R`` output pixels (``ox``, or matmul rows) times
  ``J`` channel blocks keeps ``R * J`` accumulators in registers (two buffers of
  pixels, each under TVM's 1 KiB stack limit); per reduction step it broadcasts
  ``kv`` activations of each pixel (one 32-bit word) and multiplies them against
  ``J`` weight vectors. Tiles along ``ox`` overlap at the end of a row instead of
  having a scalar tail (the overlap recomputes identical values).
* **Write-back**: a conv task computes whole output rows (enough of them to fill
  a vector when the image is narrow) into a channels-last row buffer, then writes
  NCHW with ``VL x VL`` register transposes, one vector store per channel and 16
  (8, 4) pixels (a scalar tail only when the task's plane span is below a vector).
  Matmul tiles are channels-last already: vector stores.
* **Parallel** over (n, group, channel-block tile, row group), rows innermost so
  that consecutive tasks of a thread reuse one weight slice from its L2; one tile
  per task when that gives too few tasks. Re-layouts of less than 64 KiB run
  serially (a GEMV's is a few KiB: a parallel launch costs more, and tens of
  microseconds when the pool's workers sleep).

**Exactness.** With ``z`` the activation zero point (``QOp.a_zero``) and padding
pixels holding ``fill = z + off`` (the zero point, shifted),
``out = sum (x - z) * w = sum xs * w - fill * sum(w)``; the second term is a per
output channel constant ``corr`` computed at pack time, so asymmetric u8/s8
activations (any zero point) cost nothing extra. The instruction-level bounds:

* ``vpmaddubsw`` (u8 x s8 -> saturating s16 pairs): exact iff
  ``2 * amax * wmax <= 32767`` and ``2 * amax * wmin >= -32768`` with
  ``amax = 2**a_bit - 1`` after the shift. Fails only for 8-bit activations x
  8-bit weights, which take the **wide** path (both operands int16, ``vpmaddwd``).
* **16-bit sums** (``vpaddw`` of ``tc`` consecutive ``vpmaddubsw`` results before
  widening with ``vpmaddwd``): each int16 lane then holds ``2 * tc`` products, so
  ``tc`` is bounded by ``tc * 2 * amax * wmax <= 32767`` (and the ``wmin`` twin).
  ``vpaddw`` wraps, so only the final chunk sum has to fit; the bound covers it.
* ``vpdpbusd`` and ``sdot`` sum four products straight into int32: exact for every
  width (NEON's operands are both signed: unsigned 8-bit activations shift by -128).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from soniq_tvm import tvm_shim as tv
from soniq_tvm.qop import QOp, check_weights, reference, weight_range

from . import _isa

__all__ = ["Int8DotFamily", "AVX2_DOT", "AVX512_VNNI_DOT", "NEON_SDOT", "Geometry"]

@dataclass(frozen=True)
class Geometry:
    """The conv view of an op (a matmul is a 1x1 conv over a 1 x M image)."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    groups: int
    oh: int
    ow: int
    strides: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]
    matmul: bool

    @property
    def cg(self) -> int:
        return self.c // self.groups

    @property
    def og(self) -> int:
        return self.o // self.groups

    @classmethod
    def of(cls, op: QOp) -> "Geometry":
        if op.kind == "matmul":
            m = int(np.prod(op.x_shape[:-1])) if len(op.x_shape) > 1 else 1
            k, nout = op.w_shape
            return cls(1, k, 1, m, nout, 1, 1, 1, 1, m, (1, 1), (1, 1), (0, 0, 0, 0), True)
        n, c, h, w = op.x_shape
        o, _, kh, kw = op.w_shape
        _, _, oh, ow = op.out_shape
        return cls(n, c, h, w, o, kh, kw, op.groups, oh, ow, tuple(op.strides), tuple(op.dilation),
                   tuple(op.padding), False)


@dataclass(frozen=True)
class Mode:
    """One instruction sequence: ``VL`` int32 lanes, ``kv`` products per lane and step."""

    name: str
    vl: int
    kv: int
    a_dtype: str
    w_dtype: str


MODES = {
    "avx2-madd": Mode("avx2-madd", 8, 4, "uint8", "int8"),    # vpmaddubsw + vpmaddwd(1) + vpaddd
    "avx2-sum16": Mode("avx2-sum16", 8, 4, "uint8", "int8"),  # vpmaddubsw + vpaddw, widened every tc steps
    "avx2-wide": Mode("avx2-wide", 8, 2, "int16", "int16"),   # vpmaddwd on int16 operands
    "avx512-vnni": Mode("avx512-vnni", 16, 4, "uint8", "int8"),
    "neon-sdot": Mode("neon-sdot", 4, 4, "int8", "int8"),
}

_DTYPE_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-32768, 32767)}


def _act_range(op: QOp) -> tuple[int, int]:
    if op.a_signed:
        return -(1 << (op.a_bit - 1)), (1 << (op.a_bit - 1)) - 1
    return 0, (1 << op.a_bit) - 1


def act_offset(op: QOp, mode: Mode) -> int:
    """Shift that moves the activations into the operand's range (0 if they fit)."""
    lo, hi = _act_range(op)
    dlo, dhi = _DTYPE_RANGE[mode.a_dtype]
    if dlo <= lo and hi <= dhi:
        return 0
    return dlo - lo  # unsigned operand: -lo; signed operand: -128 for u8


def pad_fill(op: QOp, mode: Mode) -> int:
    """Operand value of a padding pixel: the activation zero point, shifted."""
    return op.a_zero + act_offset(op, mode)


def sum16_limit(op: QOp) -> int:
    """Largest number of ``vpmaddubsw`` steps whose int16 sum is provably exact
    (0: even one step may saturate)."""
    lo, hi = _act_range(op)
    off = -lo if lo < 0 else 0
    amax = hi + off
    wmin, wmax = weight_range(op.w_bit, op.w_signed)
    if amax == 0:
        return 1 << 20
    lim = 1 << 20
    if wmax > 0:
        lim = min(lim, 32767 // (2 * amax * wmax))
    if wmin < 0:
        lim = min(lim, 32768 // (2 * amax * -wmin))
    return lim


def _tile_fits(r: int, j: int, mode: Mode) -> bool:
    """Each of the tile's two accumulator buffers (pixels split in halves) must
    stay below TVM's 1 KiB stack-allocation limit (bigger buffers go to the heap
    workspace and never reach registers)."""
    return (r + 1) // 2 * j * mode.vl * 4 < 1024


def relayout_cost(op: QOp, cgp: int) -> float:
    """Cost units of the activation re-layout: the bytes of ``xs`` it writes at 8
    per unit (vector words and transposes; a strided 1x1 conv gathers only the
    pixels it reads)."""
    g = Geometry.of(op)
    if g.matmul:
        return g.ow * g.groups * cgp / 8.0
    if g.kh == g.kw == 1 and tuple(g.padding) == (0, 0, 0, 0):
        h, w = g.oh, g.ow
    else:
        h, w = g.h + g.padding[0] + g.padding[2], g.w + g.padding[1] + g.padding[3]
    return g.n * h * w * g.groups * cgp / 8.0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Int8DotFamily:
    """An int8-class dot-product family for one ISA (see the module docstring).

    Knobs (``op.knobs``, all optional; :meth:`knob_space` lists the valid ones):
    ``R`` pixels (matmul rows) per tile, ``J`` accumulator vectors of output
    channels per tile, ``tc`` reduction steps summed in int16 (``avx2-sum16`` only).
    """

    def __init__(self, name: str, isa: str, need: Sequence[str], modes: Sequence[str], macs_per_cycle: dict,
                 regs: int, stream_bytes: float, writeback: float = 1.0):
        self.name = name
        self.isa = isa
        self.need = tuple(need)
        self.modes = tuple(modes)
        self.macs_per_cycle = dict(macs_per_cycle)
        self.regs = regs
        self.stream_bytes = stream_bytes
        self.writeback = writeback

    # ---- applicability --------------------------------------------------------
    def _target_ok(self, target) -> bool:
        if target is None or target.kind.name != "llvm":
            return False
        if self.isa == "neon":
            ok_arch = _isa.is_aarch64(target)
        else:
            ok_arch = _isa.is_x86(target)
        return ok_arch and all(f in _isa.features(target) for f in self.need)

    def mode(self, op: QOp) -> Mode:
        """The instruction sequence this family uses for ``op``'s widths, or the one
        its ``mode`` knob pins (the scale-group kernel runs every group of an AVX2
        layer that has an 8 x 8 group in ``avx2-wide``: int16 operands hold any
        width, exactly)."""
        pinned = (op.knobs or {}).get("mode")
        if pinned is not None:
            if pinned not in self.modes or (pinned != "avx2-wide" and MODES[pinned] != self._natural(op)):
                raise ValueError(f"{self.name}: mode {pinned!r} cannot run {op.layer} exactly")
            return MODES[pinned]
        return self._natural(op)

    def _natural(self, op: QOp) -> Mode:
        if self.isa == "avx2":
            wmin, wmax = weight_range(op.w_bit, op.w_signed)
            if wmin < -128 or wmax > 127 or sum16_limit(op) < 1:
                return MODES["avx2-wide"]
            cb = math.ceil(Geometry.of(op).cg / 4)
            return MODES["avx2-sum16"] if min(sum16_limit(op), cb) >= 2 else MODES["avx2-madd"]
        if self.isa == "avx512":
            return MODES["avx512-vnni"]
        return MODES["neon-sdot"]

    def accepts(self, op: QOp, target) -> bool:
        if not op.uniform or not self._target_ok(target):
            return False
        if op.a_dtype not in ("int8", "uint8") or op.a_bit > 8 or op.w_bit > 8:
            return False  # wider activation codes: the reference
        lo, hi = _act_range(op)
        if not lo <= op.a_zero <= hi:
            return False  # the padding value must be a code the operand holds
        g = Geometry.of(op)
        if not g.matmul and g.cg == 1 and g.groups > 1:
            return False  # depthwise: the depthwise family
        wmin, wmax = weight_range(op.w_bit, op.w_signed)
        m = self.mode(op)
        dlo, dhi = _DTYPE_RANGE[m.w_dtype]
        return dlo <= wmin and wmax <= dhi

    def cost(self, op: QOp, target) -> float | None:
        """The larger of the arithmetic (padded MACs at the mode's rate) and the
        weight stream (packed bytes at the rate the kernel streams them from
        beyond L2: what bounds a batch-1 GEMV), plus re-layout and epilogue."""
        if not self.accepts(op, target):
            return None
        return self.work(op)

    def work(self, op: QOp) -> float:
        """:meth:`cost` of an op this family accepts (no target check)."""
        m = self.mode(op)
        lay = self.layout(op)
        g = Geometry.of(op)
        padded = g.n * g.groups * lay["ogp"] * g.oh * g.ow * g.kh * g.kw * lay["cgp"]
        cycles = padded / self.macs_per_cycle[m.name]
        wbytes = g.groups * lay["ogp"] * g.kh * g.kw * lay["cgp"] * np.dtype(m.w_dtype).itemsize
        stream = wbytes / self.stream_bytes
        return float(max(cycles, stream) + relayout_cost(op, lay["cgp"]) + self.writeback * np.prod(op.out_shape))

    # ---- layout and knobs ----------------------------------------------------
    def _tc_options(self, op: QOp, cb: int) -> list[int]:
        lim = sum16_limit(op)
        opts = sorted({min(lim, cb)} | {d for d in _divisors(cb) if 2 <= d <= lim})
        return [t for t in opts if t >= 1]

    def knob_space(self, op: QOp, target=None) -> dict[str, list]:
        g = Geometry.of(op)
        m = self.mode(op)
        ob = math.ceil(g.og / m.vl)
        rs = [r for r in range(1, 17) if r <= g.ow and _tile_fits(r, 1, m)]
        js = [j for j in _divisors(ob) if j <= 8 and _tile_fits(1, j, m)]
        space = {"R": rs, "J": js}  # pairs must also satisfy _tile_fits(R, J)
        if m.name == "avx2-sum16":
            space["tc"] = self._tc_options(op, math.ceil(g.cg / m.kv))
        return space

    def default_knobs(self, op: QOp) -> dict:
        g = Geometry.of(op)
        m = self.mode(op)
        ob = math.ceil(g.og / m.vl)
        # accumulators (x2 for the int16 partials) + J weights + 1 broadcast + 1 constant
        acc_mult = 2 if m.name == "avx2-sum16" else 1
        best = None
        wide = m.name == "avx512-vnni" and g.ow > 1
        for j in (j for j in _divisors(ob) if j <= 8):
            for r in range(1, min(16 if wide else 8, g.ow) + 1):
                if r * j * acc_mult + j + 2 > self.regs or not _tile_fits(r, j, m):
                    continue
                tiles = math.ceil(g.ow / r)
                waste = tiles * r / g.ow  # the overlap of the last tile
                if wide:
                    # zmm tiles, measured on ResNet-18's convs (1x1 to 7x7, 7 to 112 wide):
                    # J = 2 with R >= 7 is the best or within 2% of it everywhere (R=7:
                    # 14 of 32 registers), J = 4 costs 0-20% (more weight bytes per MAC
                    # from L2), J = 1 10-40% (a broadcast per MAC); below R = 7 each
                    # pixel less adds ~4%
                    score = -waste * (1.15 if j == 1 else 1.0 + 0.05 * abs(j - 2)) * (1 + 0.04 * max(0, 7 - r))
                else:  # prefer more MACs per load; penalise the overlap of the last tile
                    score = (r * j) / (r + j) / waste
                if best is None or score > best[0] + 1e-9:
                    best = (score, r, j)
        knobs = {"R": best[1], "J": best[2]}
        if m.name == "avx2-sum16":
            cb = math.ceil(g.cg / m.kv)
            lim = sum16_limit(op)
            nch = math.ceil(cb / lim)
            knobs["tc"] = math.ceil(cb / nch)
        return knobs

    def knobs(self, op: QOp) -> dict:
        k = self.default_knobs(op)
        k.update({key: v for key, v in (op.knobs or {}).items() if key in ("R", "J", "tc", "mode")})
        g = Geometry.of(op)
        m = self.mode(op)
        ob = math.ceil(g.og / m.vl)
        if not (1 <= k["R"] <= g.ow) or ob % k["J"] or not _tile_fits(k["R"], k["J"], m):
            raise ValueError(f"{self.name}: knobs {k} invalid for {op.layer} (ow={g.ow}, channel blocks={ob})")
        if m.name == "avx2-sum16" and not (1 <= k["tc"] <= sum16_limit(op)):
            raise ValueError(f"{self.name}: tc={k['tc']} exceeds the exact 16-bit bound {sum16_limit(op)}")
        return k

    def layout(self, op: QOp) -> dict:
        g = Geometry.of(op)
        m = self.mode(op)
        cb = math.ceil(g.cg / m.kv)
        if m.name == "avx2-sum16":
            tc = self.knobs(op)["tc"]
            cb = math.ceil(cb / tc) * tc
        else:
            tc = cb
        return {"cb": cb, "cgp": cb * m.kv, "tc": tc, "ob": math.ceil(g.og / m.vl),
                "ogp": math.ceil(g.og / m.vl) * m.vl, "J": self.knobs(op)["J"]}

    # ---- packing --------------------------------------------------------------
    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]:
        g = Geometry.of(op)
        m = self.mode(op)
        lay = self.layout(op)
        w = np.asarray(w)
        check_weights(w, op)
        w4 = w.T.reshape(g.o, g.c, 1, 1) if g.matmul else w  # [O, Cg, KH, KW]
        full = np.zeros((g.groups, lay["ogp"], lay["cgp"], g.kh, g.kw), np.int16)  # codes: 8 bits at most
        full[:, : g.og, : g.cg] = w4.reshape(g.groups, g.og, g.cg, g.kh, g.kw)
        # [G, Obt, J, VL, Cb, kv, KH, KW] -> [G, Obt, KH, KW, Cb, J, VL, kv]
        obt, j = lay["ob"] // lay["J"], lay["J"]
        t = full.reshape(g.groups, obt, j, m.vl, lay["cb"], m.kv, g.kh, g.kw).transpose(0, 1, 6, 7, 4, 2, 3, 5)
        wp = np.ascontiguousarray(t.reshape(g.groups, obt, g.kh, g.kw, lay["cb"], j, m.vl * m.kv)).astype(m.w_dtype)
        corr = (pad_fill(op, m) * full.sum(axis=(2, 3, 4), dtype=np.int64)).astype(np.int32)  # [G, Ogp]
        return [wp, np.ascontiguousarray(corr)]

    def unpack(self, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        """Inverse of :meth:`pack`: the op's weights in their original shape."""
        g = Geometry.of(op)
        m = self.mode(op)
        lay = self.layout(op)
        wp = np.asarray(packed[0]).astype(np.int64)
        obt, j = lay["ob"] // lay["J"], lay["J"]
        t = wp.reshape(g.groups, obt, g.kh, g.kw, lay["cb"], j, m.vl, m.kv).transpose(0, 1, 5, 6, 4, 7, 2, 3)
        full = t.reshape(g.groups, lay["ogp"], lay["cgp"], g.kh, g.kw)[:, : g.og, : g.cg]
        w4 = full.reshape(g.o, g.cg, g.kh, g.kw)
        return w4.reshape(g.o, g.c).T if g.matmul else w4

    def reference(self, x, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        return reference(x, self.unpack(packed, op), op)

    # ---- kernel -------------------------------------------------------------------
    def primfunc(self, op: QOp, target=None):
        if target is not None and not self._target_ok(target):
            raise ValueError(f"{self.name} cannot compile for {target} (needs {self.isa} {self.need})")
        knobs = self.knobs(op)
        func = _build_kernel(op, self.mode(op), self.layout(op), knobs, self.regs)
        tagged = op.with_(family=self.name, knobs=knobs)
        return func.with_attr("soniq.qop", tagged.to_json()).with_attr("tirx.is_scheduled", True)


def _dot(mode: Mode, acc, a, w):
    if mode.name == "avx2-madd":
        return acc + _isa.pmaddwd(_isa.pmaddubsw(a, w), _isa.ones16())
    if mode.name == "avx2-sum16":
        return _isa.adds16(acc, _isa.pmaddubsw(a, w))  # int16 accumulator, never saturates
    if mode.name == "avx2-wide":
        return acc + _isa.pmaddwd(a, w)
    if mode.name == "avx512-vnni":
        return _isa.vpdpbusd512(acc, a, w)
    return _isa.sdot(acc, a, w)


def _build_kernel(op: QOp, mode: Mode, lay: dict, knobs: dict, regs: int):
    from ._int8dot_tir import build

    return build(op, Geometry.of(op), mode, lay, knobs, _dot, act_offset(op, mode), pad_fill(op, mode))


# Registered instances. macs_per_cycle: relative throughput of each mode, from the
# 3x3-conv benchmark in benchmarks/kernels.py (GOP/s / 6.8 on the 2-core dev host);
# it only ranks families against each other and against cpu-bitserial's rates. The
# unit is the time of 87 MACs of the first VNNI conv kernel (the low-bit and
# bit-serial rates are on that scale); VNNI's 115 and writeback 0.5 (units per
# output: 16 x 16 transposes) refit the current kernel on ResNet-18's convs
# (3x3 at 90-99% of the VNNI peak in isolation, the 7x7 stem, the strided 1x1s
# within ~15%).
# stream_bytes: weight bytes per unit in the 4096^2 batch-1 GEMV, which streams its
# weights once (VNNI 8x8: 3.4x its conv-rate time; AVX2: ~1.9x the VNNI GEMV time).
AVX2_DOT = Int8DotFamily("x86-avx2-dot", "avx2", ["avx2"], ["avx2-madd", "avx2-sum16", "avx2-wide"],
                         {"avx2-madd": 31.0, "avx2-sum16": 43.0, "avx2-wide": 25.0}, regs=16,
                         stream_bytes=9.0)
AVX512_VNNI_DOT = Int8DotFamily("x86-avx512-vnni", "avx512", ["avx512f", "avx512bw", "avx512vnni"],
                                ["avx512-vnni"], {"avx512-vnni": 115.0}, regs=32, stream_bytes=17.0, writeback=0.5)
NEON_SDOT = Int8DotFamily("arm-neon-sdot", "neon", ["neon", "dotprod"], ["neon-sdot"], {"neon-sdot": 32.0},
                          regs=32, stream_bytes=9.0)  # not measured: the AVX2 figure
