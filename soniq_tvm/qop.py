"""The integer-op descriptor: the contract between the passes and the kernels.

A :class:`QOp` describes one integer conv2d or matmul as a kernel sees it: the
integer activation tensor it reads, its integer weights (a compile-time constant),
their bit widths and the op's geometry. It is stored as JSON in the ``soniq.qop``
attribute of the PrimFunc that computes it, so every pass reads and writes it
through the IR alone, and a schedule rule can recognise the kernels it owns.

Arithmetic contract of every kernel family (the numpy twin is :func:`reference`):

    out[int32] = sum over the reduction of  (int(x) - a_zero) * int(w)

with ``x`` the activation codes as stored and a padding pixel standing for the
code ``a_zero`` (a real zero), exact, no saturation anywhere. ``a_zero`` is the
activation's zero point (asymmetric u8/s8 files: ORT's quantizer writes one per
tensor); families that cannot fold it say "not mine" for ``a_zero != 0``.

Shapes: ``conv2d`` reads ``x[N, C, H, W]`` and ``w[O, C/groups, KH, KW]`` and writes
``out[N, O, OH, OW]``; ``matmul`` reads ``x[..., K]`` and ``w[K, N]`` and writes
``out[..., N]``.

Bits: ``a_bits`` holds one entry per input channel (``C`` or ``K``) and ``w_bits``
one per channel along ``w_axis`` ("in": the reduction channel, SONIQ's tied case;
"out": the output channel). After the split pass each op is *uniform*: every entry
of each list is equal.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np

__all__ = ["QOp", "weight_range", "decode_bitplanes", "encode_bitplanes", "reference"]

VERSION = 1


def weight_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of one weight channel (signed 1-bit is bipolar {-1, +1})."""
    if not signed:
        return 0, (1 << bits) - 1
    if bits == 1:
        return -1, 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def check_weights(w: np.ndarray, op: "QOp") -> None:
    """``ValueError`` unless every weight is a code of ``op``'s width: in its range,
    and -1 or +1 where the width is bipolar (a 0 there has no 1-bit code: the
    bit-plane packers would turn it into -1)."""
    lo, hi = weight_range(op.w_bit, op.w_signed)
    w = np.asarray(w)
    if w.size and (w.min() < lo or w.max() > hi):
        raise ValueError(f"weights of {op.layer} exceed the {op.w_bit}-bit range [{lo}, {hi}]")
    if op.bipolar and w.size and (w == 0).any():
        raise ValueError(f"weights of {op.layer} are bipolar (-1 or +1) and hold a 0")


@dataclass(frozen=True)
class QOp:
    kind: Literal["conv2d", "matmul"]
    layer: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    w_axis: Literal["in", "out"] = "in"
    w_signed: bool = True
    a_signed: bool = True
    a_dtype: str = "int8"
    a_zero: int = 0  # activation zero point: the kernel computes with x - a_zero
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    group: int = -1  # index of this channel group inside its layer; -1: whole layer
    family: str = "int8-ref"  # kernel family that computes it
    knobs: dict = field(default_factory=dict, compare=False, hash=False)
    packed_bytes: int = 0  # bytes of the family's packed weight constants (0: not packed yet)
    # the file's channel numbers of a group's input / output channels (empty: all, in order);
    # set by the split, read by verify's layer check
    in_index: tuple[int, ...] = field(default=(), compare=False, hash=False)
    out_index: tuple[int, ...] = field(default=(), compare=False, hash=False)
    version: int = VERSION

    # ---- derived ---------------------------------------------------------
    @property
    def uniform(self) -> bool:
        return len(set(self.w_bits)) == 1 and len(set(self.a_bits)) == 1

    @property
    def w_bit(self) -> int:
        """The weight width a kernel must support (the widest channel)."""
        return max(self.w_bits)

    @property
    def a_bit(self) -> int:
        return max(self.a_bits)

    @property
    def bipolar(self) -> bool:
        return self.w_signed and self.w_bit == 1

    @property
    def in_channels(self) -> int:
        return self.x_shape[1] if self.kind == "conv2d" else self.x_shape[-1]

    @property
    def out_channels(self) -> int:
        return self.w_shape[0] if self.kind == "conv2d" else self.w_shape[1]

    @property
    def reduction(self) -> int:
        """Length of one output's dot product."""
        if self.kind == "conv2d":
            return self.w_shape[1] * self.w_shape[2] * self.w_shape[3]
        return self.w_shape[0]

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.kind == "matmul":
            return tuple(self.x_shape[:-1]) + (self.w_shape[1],)
        n, _, h, w = self.x_shape
        o, _, kh, kw = self.w_shape
        (sh, sw), (dh, dw) = self.strides, self.dilation
        pt, pl, pb, pr = self.padding
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return (n, o, oh, ow)

    @property
    def macs(self) -> int:
        return int(np.prod(self.out_shape)) * self.reduction

    @property
    def weight_bytes_int8(self) -> int:
        return int(np.prod(self.w_shape))

    @property
    def weight_bytes_bitplanes(self) -> int:
        """Bytes of the weights stored as bit-planes: ``w_bit`` planes of one bit
        per weight, each output row padded to whole bytes."""
        return self.out_channels * self.w_bit * ((self.reduction + 7) // 8)

    # ---- serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "QOp":
        if d.get("version") != VERSION:
            raise ValueError(f"QOp version {d.get('version')} is not {VERSION}")
        tup = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tup})

    @classmethod
    def from_json(cls, text: str) -> "QOp":
        return cls.from_dict(json.loads(text))

    def with_(self, **changes) -> "QOp":
        return replace(self, **changes)


# ---- bit-plane packing (numpy twin of the kernels' weight layout) --------------

def weight_matrix(w: np.ndarray, op: QOp) -> np.ndarray:
    """Weights as ``[out_channels, reduction]`` (conv: reduction order c, kh, kw)."""
    if op.kind == "conv2d":
        return w.reshape(w.shape[0], -1)
    return w.T


def encode_bitplanes(w: np.ndarray, op: QOp) -> np.ndarray:
    """Pack integer weights into ``uint8[out, w_bit, ceil(reduction / 8)]``.

    Plane ``j`` holds bit ``j`` of each weight's ``w_bit``-bit code, weight ``k`` of a
    row at bit ``k % 8`` of byte ``k // 8``. Codes: two's complement for signed
    widths >= 2, ``(w + 1) / 2`` for bipolar 1-bit, the value itself if unsigned.
    """
    m = weight_matrix(np.asarray(w), op).astype(np.int64)
    b = op.w_bit
    check_weights(m, op)
    code = (m + 1) // 2 if op.bipolar else m & ((1 << b) - 1)
    rows, k = code.shape
    kp = (k + 7) // 8 * 8
    padded = np.zeros((rows, kp), np.int64)
    padded[:, :k] = code
    planes = (padded[:, None, :] >> np.arange(b)[None, :, None]) & 1  # [rows, b, kp]
    return np.packbits(planes.astype(np.uint8), axis=-1, bitorder="little")


def decode_bitplanes(p: np.ndarray, op: QOp) -> np.ndarray:
    """Inverse of :func:`encode_bitplanes`; returns ``int32[out, reduction]``."""
    b = op.w_bit
    bits = np.unpackbits(p, axis=-1, bitorder="little")[..., : op.reduction].astype(np.int64)
    code = (bits << np.arange(b)[None, :, None]).sum(axis=1)
    if op.bipolar:
        val = 2 * code - 1
    elif op.w_signed:
        val = code - ((code >> (b - 1)) << b)
    else:
        val = code
    return val.astype(np.int32)


def reference(x: np.ndarray, w: np.ndarray, op: QOp) -> np.ndarray:
    """Exact integer result of ``op`` in numpy (int64 accumulation, returned as int64)."""
    x = np.asarray(x).astype(np.int64) - op.a_zero
    w = np.asarray(w).astype(np.int64)
    if op.kind == "matmul":
        return x @ w
    pt, pl, pb, pr = op.padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    _, _, oh, ow = op.out_shape
    (sh, sw), (dh, dw) = op.strides, op.dilation
    og = o // op.groups
    out = np.zeros((n, o, oh, ow), np.int64)
    for g in range(op.groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        for r in range(kh):
            for s in range(kw):
                win = xs[:, :, r * dh: r * dh + sh * (oh - 1) + 1: sh, s * dw: s * dw + sw * (ow - 1) + 1: sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", win, ws[:, :, r, s])
    return out
