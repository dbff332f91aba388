"""Lookup-table kernels (T-MAC style) for 1-4-bit weights against 2-8-bit activations.

For a matmul ``out[m, n] = sum_k x[m, k] * w[k, n]`` the weights are stored as
bit-planes and the activations, in groups of ``g = 4`` consecutive reduction
values, become tables of their 16 partial sums (built at run time, once per row):
each 4-bit nibble of a weight plane picks the partial sum of the activations
whose weight bit is set. One ``vpshufb`` (AVX2 ymm, AVX-512BW zmm) or NEON
``tbl`` looks up 32 / 64 / 16 nibbles at once, so a plane costs one lookup per
4 weights whatever the activation width is. Matmuls only (batch-1 GEMV and
small-M GEMM, QOp kind ``"matmul"``).

**Codes.** Both operands are shifted to unsigned codes: activations ``x' = x +
off`` in ``[0, 2**a - 1]`` (``off = 2**(a-1)`` for signed activations, else 0),
weights offset-binary ``w = s * u - z`` with ``u`` in ``[0, 2**b - 1]`` (signed
``b >= 2``: ``u = w + 2**(b-1)``, ``s = 1``; bipolar 1-bit: ``u = (w + 1) / 2``,
``s = 2, z = 1``; unsigned: ``u = w``). Then

    sum_k x w = s * sum_j 2**j sum_g T_g[nib_j(g)] - z * sum_k x' - off * sum_k w

where ``T_g[e]`` is the sum of the shifted activations of group ``g`` selected by
the bits of ``e`` and ``nib_j(g)`` the 4 bits of plane ``j`` of ``u`` over the
group. ``sum_k x'`` is a per-row term (summed while the tables are built),
``off * sum_k w`` a per-output-channel constant from :meth:`LutFamily.pack`
(``corr``, as in the int8-dot families). Reduction padding holds ``x' = 0`` and
``u = 0``.

**Lookups and 16-bit partial sums.** ``T_g[e] <= Tmax = 4 * (2**a - 1) <= 1020``
needs 10 bits and a lookup gives a byte, so the table is split: a low-byte table
``TL = T & 255`` and, only when ``Tmax > 255`` (``a >= 7``), a high-byte table
``TH = T >> 8 <= Tmax >> 8 <= 3``. The planes go through the kernel in *units*:

* a **pair** (x86): planes ``j, j+1`` of a channel in adjacent bytes. One
  ``vpmaddubsw`` with coefficients ``(1, 2)`` turns the two low-byte lookups into
  the int16 ``L_j + 2 L_{j+1} <= 3 * 255`` (no saturation), added into a uint16
  partial sum ``C``; the high bytes are added as bytes into ``H`` and combined the
  same way once per chunk.
* a **single** plane (1- and 3-bit weights on x86; every plane on NEON): the 64
  bytes are 64 channels. ``A`` (uint16 over byte pairs) adds the lookups as
  16-bit words, ``sum (L[2q] + 256 L[2q+1]) mod 2**16``, and ``B`` adds their high
  bytes, ``sum L[2q+1]``; at the end of the chunk ``sum L[2q] = A - 256 B (mod
  2**16)``. ``H`` as above.

**Overflow bound.** Per chunk of ``n`` groups and output channel, with ``Lmax =
min(255, Tmax)`` and ``Hmax = Tmax >> 8``, every partial sum is a sum of
non-negative terms that fits its container: ``C <= n * 3 * Lmax``, ``B`` and
``sum L[2q]`` ``<= n * Lmax`` (uint16: ``<= 65535``) and ``H <= n * Hmax`` (uint8:
``<= 255``). :func:`chunk_groups` is the largest such ``n`` (8-bit activations: 85
groups for both unit kinds; 6 bits and fewer: 86 for pairs, 260 for singles).
Only ``A`` is used modulo ``2**16``, and only through the exact difference above.
Each chunk is widened to int32 and added with its plane weight ``2**j`` into the
output row; the int32 total is at most ``K * 255 * 15`` (``s * u <= 15``), below
``2**31`` for ``K <= 2**19`` (:data:`MAX_REDUCTION`).

**Layout.** Weights ``wp[NT, L]`` (uint8): per channel tile (``CT = JB * VB``
channels, ``VB`` = vector bytes) the units one after the other, each
``[GP, V, VB]`` (group pairs, vectors: ``JB`` for a single, ``2 JB`` of ``VB / 2``
channels for a pair). Byte ``b`` holds the nibbles of groups ``2gp`` (bits 0-3) and
``2gp+1`` (bits 4-7); a single's byte ``b`` is channel :func:`channel_order`
``(b)`` (even bytes: first half of the block, odd bytes: second half, so the
widened sums come out in order), a pair's bytes ``2q, 2q+1`` are planes ``j,
j+1`` of channel ``q``. Streamed contiguously per (tile, unit): the stored bytes
are the real width, ``b`` bits per weight (3-bit weights cost 3 bits; the packed
low-bit families store them in 4).

**Tile.** ``R`` rows x ``JB`` channel blocks of partial sums, the tables of the
current group pair of each row, the packed vector and its two nibble vectors;
the default is the largest tile that fits the register file with the least
padding. Parallel over (channel tile, row tile), row tiles inner so a thread
reuses its weight tile from cache.

Instances: ``x86-avx512-lut`` (zmm ``vpshufb``, AVX-512BW), ``x86-avx2-lut``
(ymm ``vpshufb``), ``arm-neon-lut`` (``tbl``, aarch64 NEON).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from soniq_tvm.qop import QOp, check_weights, reference

from . import _isa
from .bitserial import act_offset  # x' = x + 2**(a-1) for signed activations: the unsigned code
from .lowbit import codes  # w = s * u - z: offset-binary, bipolar and unsigned weight codes

__all__ = ["LutFamily", "AVX512_LUT", "AVX2_LUT", "NEON_LUT", "LutMode", "MODES", "codes", "act_offset",
           "table_max", "needs_high_table", "chunk_groups", "channel_order", "planes", "units", "GROUP",
           "MAX_REDUCTION"]

GROUP = _isa.LUT_GROUP  # reduction values per table (16 entries = 4 bits of a plane)
MAX_REDUCTION = 1 << 19  # K * 255 * 15 < 2**31 for the int32 output accumulators
MAX_ROWS = 64  # beyond this the tables (32 bytes per row and group) outgrow L2; the dot families win anyway
# vector instructions per lookup vector (VB byte lookups) besides the nibble extraction
# (LutMode.nibble_ops), by unit kind and high-byte table: the low-byte lookup and its
# accumulation (single: add + shift + add; pair: vpmaddubsw + add), with the high table
# one more lookup + byte add
OPS = {("single", False): 4, ("single", True): 6, ("pair", False): 3, ("pair", True): 5}


@dataclass(frozen=True)
class LutMode:
    """``vb`` bytes per lookup vector; ``regs``: vector registers; ``pairs``: whether
    two planes share a vector (``vpmaddubsw`` weighs them 1 and 2; x86 only);
    ``nibble_ops``: instructions per nibble vector (AND, or shift + AND for two:
    1.5; one GFNI affine or NEON ``ushr`` for the high nibble: 1)."""

    name: str
    vb: int
    regs: int
    pairs: bool
    nibble_ops: float


MODES = {
    "pshufb512": LutMode("pshufb512", 64, 32, True, 1.0),
    "pshufb256": LutMode("pshufb256", 32, 16, True, 1.5),
    "tbl128": LutMode("tbl128", 16, 32, False, 1.0),
}


def table_max(op: QOp) -> int:
    """Largest table entry: the sum of 4 shifted activations."""
    return GROUP * ((1 << op.a_bit) - 1)


def needs_high_table(op: QOp) -> bool:
    return table_max(op) > 255


def chunk_groups(op: QOp, kind: str) -> int:
    """Most groups whose 16-bit (and 8-bit high-byte) partial sums are exact for a
    unit of ``kind``: ``n * w * min(255, Tmax) <= 65535`` (``w`` = 3 for a pair's
    ``L_j + 2 L_{j+1}``, 1 for a single) and ``n * (Tmax >> 8) <= 255``."""
    tmax = table_max(op)
    n = 65535 // ((3 if kind == "pair" else 1) * min(255, tmax))
    if tmax >> 8:
        n = min(n, 255 // (tmax >> 8))
    return n


def channel_order(vb: int) -> np.ndarray:
    """Channel (within its block) of each byte position of a single-plane vector:
    byte ``2q`` holds channel ``q``, byte ``2q+1`` channel ``vb/2 + q``."""
    b = np.arange(vb)
    return (b % 2) * (vb // 2) + b // 2


def planes(op: QOp) -> int:
    return 1 if op.bipolar else op.w_bit


def units(op: QOp, mode: LutMode) -> list[tuple[str, int]]:
    """``(kind, first plane)`` of each unit, in kernel order."""
    p = planes(op)
    if not mode.pairs:
        return [("single", j) for j in range(p)]
    return [("pair", j) for j in range(0, p - 1, 2)] + ([("single", p - 1)] if p % 2 else [])


class LutFamily:
    """Lookup-table matmul kernels for one ISA (see the module docstring).

    Knobs (``op.knobs``): ``R`` rows per tile, ``JB`` blocks of ``VB`` output channels
    per tile.
    """

    max_bits = 4

    def __init__(self, name: str, mode: str, isa: str, need: Sequence[str], rates: dict):
        self.name = name
        self.mode = MODES[mode]
        self.isa = isa
        self.need = tuple(need)
        self.rates = dict(rates)

    # ---- applicability --------------------------------------------------------------------
    def _target_ok(self, target) -> bool:
        if target is None or target.kind.name != "llvm":
            return False
        arch_ok = _isa.is_aarch64(target) if self.isa == "neon" else _isa.is_x86(target)
        return arch_ok and all(f in _isa.features(target) for f in self.need)

    def accepts(self, op: QOp, target) -> bool:
        if op.kind != "matmul" or op.a_zero or not op.uniform or not self._target_ok(target):
            return False
        if op.a_dtype not in ("int8", "uint8") or not 1 <= op.a_bit <= 8 or op.w_bit > self.max_bits:
            return False
        return op.reduction <= MAX_REDUCTION and self.rows(op) <= MAX_ROWS

    def cost(self, op: QOp, target) -> float | None:
        """Time in the int8-dot families' units (~cycles of the 2-core dev host): the
        larger of the arithmetic (lookup vectors of the padded tile times their
        instructions, :data:`OPS` + the nibble extraction, at the measured rate:
        ``ops_r1`` when the weights stream through once (one row tile, GEMV),
        ``ops_mm`` when several row tiles reuse them from cache) and the packed-weight
        stream, plus the table build (per row and group) and the output epilogue."""
        if not self.accepts(op, target):
            return None
        lay = self.layout(op)
        hi = needs_high_table(op)
        row_tiles = math.ceil(lay["M"] / lay["R"])
        vectors = row_tiles * lay["R"] * lay["NP"] * lay["KG"] / lay["VB"]
        ops = sum(vectors * (2 if kind == "pair" else 1) * (OPS[(kind, hi)] + self.mode.nibble_ops)
                  for kind, _ in units(op, self.mode))
        compute = ops / self.rates["ops_r1" if row_tiles == 1 else "ops_mm"]
        stream = self.packed_weight_bytes(op) / self.rates["bytes"]
        tables = lay["M"] * lay["KG"] * self.rates["table"]
        return float(max(compute, stream) + tables + 2.0 * lay["M"] * lay["N"])

    # ---- layout and knobs -------------------------------------------------------------------
    @staticmethod
    def rows(op: QOp) -> int:
        return int(np.prod(op.x_shape[:-1])) if len(op.x_shape) > 1 else 1

    def _fits_stack(self, op: QOp, r: int, jb: int) -> bool:
        # each partial-sum buffer (R x vectors of a unit) under TVM's 1 KiB stack limit (registers)
        nvec = 2 * jb if any(kind == "pair" for kind, _ in units(op, self.mode)) else jb
        return r * nvec * self.mode.vb < 1024

    def _regs(self, op: QOp, r: int, jb: int) -> int:
        hi = needs_high_table(op)
        per_jb = max((2 if kind == "pair" else 1) * ((1 if kind == "pair" else 2) + hi)
                     for kind, _ in units(op, self.mode))
        # partial sums + the tables of one group pair per row + the packed vector, its 2
        # nibble vectors and a lookup (the nibble mask and pair coefficients may spill:
        # on AVX2, JB=2 with them in memory ran 7% faster than JB=1 in registers)
        return r * jb * per_jb + r * (4 if hi else 2) + 4

    def knob_space(self, op: QOp, target=None) -> dict[str, list]:
        m = self.rows(op)
        nb = math.ceil(op.out_channels / self.mode.vb)
        return {"R": [r for r in range(1, 5) if r <= m and self._fits_stack(op, r, 1)],
                "JB": [jb for jb in range(1, 9) if (jb == 1 or jb <= nb) and self._fits_stack(op, 1, jb)]}

    def default_knobs(self, op: QOp) -> dict:
        m = self.rows(op)
        nb = math.ceil(op.out_channels / self.mode.vb)
        best = None
        for r in range(1, min(4, m) + 1):
            for jb in range(1, min(8, nb) + 1):
                if self._regs(op, r, jb) > self.mode.regs or not self._fits_stack(op, r, jb):
                    continue
                waste = math.ceil(nb / jb) * jb / nb * math.ceil(m / r) * r / m
                # the tiles shared by 2 or 4 threads (GEMV 4096 on 2 threads: 16 tiles of
                # JB=4 ran 8% faster than 11 of JB=6)
                tiles = math.ceil(nb / jb) * math.ceil(m / r)
                balance = sum(math.ceil(tiles / th) * th / tiles for th in (2, 4)) / 2
                score = (r * jb) / (r + jb) / waste / balance
                if best is None or score > best[0] + 1e-9:
                    best = (score, r, jb)
        if best is None:
            return {"R": 1, "JB": 1}
        return {"R": best[1], "JB": best[2]}

    def knobs(self, op: QOp) -> dict:
        k = self.default_knobs(op)
        k.update({key: v for key, v in (op.knobs or {}).items() if key in ("R", "JB")})
        if not (1 <= k["R"] <= self.rows(op)) or k["JB"] < 1 or not self._fits_stack(op, k["R"], k["JB"]):
            raise ValueError(f"{self.name}: knobs {k} invalid for {op.layer} (rows={self.rows(op)})")
        return k

    def layout(self, op: QOp) -> dict:
        """Tile geometry and the runs of identical units (``kind``, first plane ``p0``,
        ``nu`` units, ``nvec`` vectors per group pair, chunk of ``chp`` group pairs,
        byte offset ``off`` in the tile's weights)."""
        k, n = op.w_shape
        knobs = self.knobs(op)
        vb, jb = self.mode.vb, knobs["JB"]
        gp = math.ceil(k / (2 * GROUP))
        ct = jb * vb
        runs, off = [], 0
        for kind, p0 in units(op, self.mode):
            if runs and runs[-1]["kind"] == kind:
                runs[-1]["nu"] += 1
            else:
                nvec = 2 * jb if kind == "pair" else jb
                nch = math.ceil(gp / (chunk_groups(op, kind) // 2))
                runs.append({"kind": kind, "p0": p0, "nu": 1, "nvec": nvec, "chp": math.ceil(gp / nch),
                             "off": off})
            off += gp * (2 * jb if kind == "pair" else jb) * vb
        nt = math.ceil(n / ct)
        return {"M": self.rows(op), "K": k, "N": n, "GP": gp, "KG": 2 * gp, "CT": ct, "NT": nt, "NP": nt * ct,
                "R": knobs["R"], "JB": jb, "VB": vb, "L": off, "runs": runs}

    def packed_weight_bytes(self, op: QOp) -> int:
        lay = self.layout(op)
        return lay["NT"] * lay["L"]

    # ---- packing ---------------------------------------------------------------------------------
    def _nibble_bytes(self, u: np.ndarray, lay: dict, j: int) -> np.ndarray:
        """``uint8[NP, GP]``: plane ``j`` nibbles of groups ``2gp`` (low) and ``2gp+1`` (high)."""
        bits = ((u >> j) & 1).reshape(lay["NP"], lay["KG"], GROUP)
        nib = (bits << np.arange(GROUP)).sum(axis=-1)
        return nib[:, 0::2] | (nib[:, 1::2] << 4)

    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]:
        """``[wp uint8[NT, L], corr int32[NP]]`` (see the module docstring)."""
        w = np.asarray(w).astype(np.int64)
        check_weights(w, op)
        lay = self.layout(op)
        s, z = codes(op)
        k, n = w.shape
        nt, gp, vb, jb = lay["NT"], lay["GP"], lay["VB"], lay["JB"]
        u = np.zeros((lay["NP"], lay["KG"] * GROUP), np.int64)
        u[:n, :k] = ((w + z) // s).T
        parts = []
        for kind, j in units(op, self.mode):
            if kind == "pair":  # [NT, 2JB vectors, VB/2 channels, 2 planes, GP]
                both = np.stack([self._nibble_bytes(u, lay, j), self._nibble_bytes(u, lay, j + 1)], axis=1)
                t = both.reshape(nt, 2 * jb, vb // 2, 2, gp).reshape(nt, 2 * jb, vb, gp)
            else:  # [NT, JB, VB positions, GP]
                t = self._nibble_bytes(u, lay, j).reshape(nt, jb, vb, gp)[:, :, channel_order(vb)]
            parts.append(t.transpose(0, 3, 1, 2).reshape(nt, -1))  # [NT, GP * V * VB]
        wp = np.ascontiguousarray(np.concatenate(parts, axis=1)).astype(np.uint8)
        corr = np.zeros(lay["NP"], np.int64)
        corr[:n] = act_offset(op) * w.sum(axis=0)
        return [wp, corr.astype(np.int32)]

    def unpack(self, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        """Inverse of :meth:`pack`: the weights ``[K, N]``."""
        lay = self.layout(op)
        nt, gp, vb, jb = lay["NT"], lay["GP"], lay["VB"], lay["JB"]
        wp = np.asarray(packed[0]).astype(np.int64)
        u = np.zeros((lay["NP"], lay["KG"] * GROUP), np.int64)
        off = 0
        for kind, j in units(op, self.mode):
            nvec = 2 * jb if kind == "pair" else jb
            t = wp[:, off: off + gp * nvec * vb].reshape(nt, gp, nvec, vb).transpose(0, 2, 3, 1)
            off += gp * nvec * vb
            if kind == "pair":
                t = t.reshape(nt, 2 * jb, vb // 2, 2, gp)
                byts = [(j + i, t[:, :, :, i].reshape(lay["NP"], gp)) for i in range(2)]
            else:
                b = np.empty_like(t)
                b[:, :, channel_order(vb)] = t
                byts = [(j, b.reshape(lay["NP"], gp))]
            for plane, byte in byts:
                nib = np.stack([byte & 15, byte >> 4], axis=-1).reshape(lay["NP"], lay["KG"])
                bits = ((nib[..., None] >> np.arange(GROUP)) & 1).reshape(lay["NP"], -1)
                u += bits << plane
        s, z = codes(op)
        k, n = op.w_shape
        return (s * u[:n, :k] - z).T

    def reference(self, x, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        return reference(x, self.unpack(packed, op), op)

    # ---- kernel -------------------------------------------------------------------------------------
    def primfunc(self, op: QOp, target=None):
        if target is not None and not self._target_ok(target):
            raise ValueError(f"{self.name} cannot compile for {target} (needs {self.isa} {self.need})")
        if op.kind != "matmul":
            raise ValueError(f"{self.name} computes matmuls only, not {op.kind} ({op.layer})")
        from ._lut_tir import build

        knobs = self.knobs(op)
        func = build(op, self.mode.name, self.layout(op), codes(op), act_offset(op), needs_high_table(op))
        tagged = op.with_(family=self.name, knobs=knobs)
        return func.with_attr("soniq.qop", tagged.to_json()).with_attr("tirx.is_scheduled", True)


# Rates on the scale of the other CPU families' costs (~cycles of the 2-core znver5 dev
# host), fitted to interleaved 2-thread runs (benchmarks/kernels.py) of the 4096 x 4096
# matmul at M = 1 and 16, as ratios to the packed low-bit family of the same ISA:
# "ops_r1" / "ops_mm" instructions (OPS + nibble_ops) per unit, "bytes" the low-bit
# families' stream rate (same contiguous packed stream), "table" units per row and group
# (~12 cycles single-threaded). Measured time / x86-*-lowbit time (model in brackets):
# AVX-512 (host): GEMV w1a4 0.85 (0.86), w1a8 1.08 (1.18), w2a4 1.15 (1.06), w2a8 1.57
# (1.56), w3a8 1.24 (1.25), w4a4 1.11 (1.05), w4a8 1.56 (1.57); M=16 w2a8 1.83 (1.78),
# w1a4 0.77 (0.83). AVX2 (haswell code): GEMV w1a4 0.43 (0.42), w1a8 0.71 (0.57), w2a4
# 0.62 (0.68), w2a8 0.97 (0.97), w3a8 1.54 (1.52), w4a4 1.10 (1.34), w4a8 1.69 (1.92);
# M=16 w2a8 1.02 (1.03), w1a4 0.35 (0.45). Against cpu-bitserial (AVX-512 host, GEMV):
# w1a1 1.40 (2.06), w1a2 1.11 (1.07), w2a2 0.93 (0.89). NEON: not measured (no aarch64
# host): the AVX2 rates per instruction, as arm-neon-sdot uses the AVX2 figures.
AVX512_LUT = LutFamily("x86-avx512-lut", "pshufb512", "avx512", ["avx512f", "avx512bw"],
                       {"ops_r1": 1.72, "ops_mm": 2.9, "bytes": 14.4, "table": 10.0})
AVX2_LUT = LutFamily("x86-avx2-lut", "pshufb256", "avx2", ["avx2"],
                     {"ops_r1": 2.0, "ops_mm": 3.0, "bytes": 10.0, "table": 10.0})
NEON_LUT = LutFamily("arm-neon-lut", "tbl128", "neon", ["neon"],
                     {"ops_r1": 2.0, "ops_mm": 3.0, "bytes": 9.0, "table": 10.0})
