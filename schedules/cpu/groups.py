"""One kernel for all the activation scale groups of a matmul layer.

A layer whose input channels carry several steps (one per precision group, the
SONIQ export) is folded into one exact integer kernel per group and a float combine
``sum_g float(acc_g) * (s_g * sw)`` (:mod:`soniq_tvm.passes.fold_qdq`). Run as
separate kernels, every group gathers its channels, writes an int32 tensor of the
layer's full output size, and the combine reads them all back; on BERT-sized
matmuls that costs more than the arithmetic. This kernel (``_groups_tir.py``) takes
the int8-dot kernels the pack phase chose for the groups, with their packed weights
as they are, and runs them one after the other on each output tile, adding each
group's term to a float tile in registers and storing it once.

:func:`scale_group_matmul` returns ``None`` ("not applicable") unless every group is
an int8-dot matmul kernel of one family with the same rows, outputs, tile knobs and
operand type. On AVX2 an 8 x 8 group is exact only in the int16 ``avx2-wide`` mode
(``vpmaddwd``), another operand layout than the u8 modes of the narrower groups: such
a layer runs every group in ``avx2-wide`` (re-packed, the mode pinned by the ``mode``
knob of the ops the kernel records) when the family's cost says the narrow groups'
slower int16 arithmetic costs less than what one kernel saves, ``COMBINE_UNITS`` per
output of each extra group (its int32 plane and its pass of the float combine): the
3-channel stem and the 1x1 downsamples of ResNet-18 {2,8} fuse, its 3x3 layers and
BERT's matmuls do not. A group packed for the ``avx2-sum16`` mode runs with the
``avx2-madd`` step here: same layout, and its exactness bound is the looser one.
"""
from __future__ import annotations

import json

import numpy as np

from soniq_tvm.qop import QOp
from soniq_tvm.schedules import registry

from . import _isa
from .int8dot import MODES, Geometry, Int8DotFamily, _dot, act_offset, pad_fill

__all__ = ["scale_group_matmul", "scale_group_conv", "GROUPS_ATTR"]

GROUPS_ATTR = "soniq.scale_groups"  # the fused kernel's group QOps (JSON list)
SHUFFLE_MAX = 512  # widest input row gathered by one constant shuffle
WIDE = "avx2-wide"
# cost units (the int8-dot families' scale) per output element of a group run as a
# separate kernel: its int32 store plus the combine's load, convert, scale and add
COMBINE_UNITS = 3.0


def _mode(family, op: QOp):
    m = family.mode(op)
    return MODES["avx2-madd"] if m.name == "avx2-sum16" else m


def _shared(parts):
    """What the groups' kernels share, or None when they cannot share one kernel:
    ``(family, mode, knobs, wps, corrs, scales, meta, modes, parts)`` with each group's
    packed weights, correction and per-output factor padded to the packed outputs,
    and ``meta`` rows (first entry in ``columns``, channels, first ``xs`` column,
    words, offset, fill)."""
    if len(parts) < 2:
        return None
    ops = [p[0] for p in parts]
    names = {op.family for op in ops}
    if len(names) != 1 or len({op.kind for op in ops}) != 1:
        return None
    family = registry.get(next(iter(names)))
    if not isinstance(family, Int8DotFamily):  # the pack phase chose it for the target
        return None
    names = [family.mode(op).name for op in ops]
    if WIDE in names and len(set(names)) > 1:
        if not _wide_pays(family, ops):
            return None
        tile = family.knobs(ops[names.index(WIDE)])
        parts = [_pinned(family, p, WIDE, tile) for p in parts]  # int16 operands hold every group exactly
        ops = [p[0] for p in parts]
    modes = [_mode(family, op) for op in ops]
    if len({(m.vl, m.kv, m.a_dtype, m.w_dtype) for m in modes}) != 1:
        return None
    knobs = [family.knobs(op) for op in ops]
    if len({(k["R"], k["J"]) for k in knobs}) != 1 or len({op.a_dtype for op in ops}) != 1:
        return None
    n = {op.w_shape[1] if op.kind == "matmul" else op.w_shape[0] for op in ops}
    if len(n) != 1:
        return None
    n = n.pop()
    if len({tuple(op.out_index) for op in ops}) != 1 or (ops[0].out_index and len(ops[0].out_index) != n):
        return None  # every group produces every output channel, in one order
    wps, corrs, scales, meta = [], [], [], []
    x0 = s0 = 0
    for (op, wp, corr, scale), md in zip(parts, modes):
        wp = np.asarray(wp)
        if wp.ndim != 7 or wp.shape[0] != 1:
            return None
        wps.append(wp)
        corrs.append(np.asarray(corr, np.int32).reshape(-1))
        sc = np.zeros(corrs[-1].size, np.float32)
        sc[:n] = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (n,))
        scales.append(sc)
        k = op.w_shape[0] if op.kind == "matmul" else op.w_shape[1]
        cb = wp.shape[4]
        meta.append([x0, k, s0, cb, act_offset(op, md), pad_fill(op, md)])
        x0, s0 = x0 + k, s0 + cb * md.kv
    if len({w.shape[1:4] + w.shape[5:] for w in wps}) != 1 or len({c.size for c in corrs}) != 1:
        return None
    return family, modes[0], knobs[0], wps, corrs, scales, meta, modes, parts


def _wide_pays(family, ops) -> bool:
    """Whether one int16 kernel costs less than the groups apart: the narrow groups slow
    down (``vpmaddwd`` on int16 against ``vpmaddubsw`` on bytes), one kernel saves each
    extra group's int32 plane and its pass of the float combine. Counted on default
    tiles: a tuned tile or ``tc`` must not change whether the layer fuses."""
    extra = sum(family.work(op.with_(knobs={"mode": WIDE})) - family.work(op.with_(knobs={})) for op in ops)
    return extra <= (len(ops) - 1) * COMBINE_UNITS * float(np.prod(ops[0].out_shape))


def _pinned(family, part, mode: str, tile: dict):
    """A group ``(op, wp, corr, scale)`` re-packed for ``mode`` and the ``tile``'s R
    and J (the mode pinned by the op's ``mode`` knob, which the fused kernel's
    recorded ops keep, so every reader of them unpacks the layout it runs)."""
    op, wp, corr, scale = part
    knobs = {"R": tile["R"], "J": tile["J"], "mode": mode}
    if all(family.knobs(op).get(k) == v for k, v in knobs.items() if k != "mode") and family.mode(op).name == mode:
        return part
    pinned = op.with_(knobs=knobs)
    wp2, corr2 = family.pack(family.unpack([wp, corr], op), pinned)
    return pinned, wp2, corr2, scale


def _columns(columns, x0: int, width: int):
    """The channels the groups read (default: all of a tensor of ``x0``), or None."""
    columns = np.arange(x0) if columns is None else np.asarray(columns, np.int64).reshape(-1)
    if columns.size != x0 or columns.min() < 0 or columns.max() >= width:
        return None
    return columns


def scale_group_matmul(parts, columns=None, x_shape=None):
    """``parts``: per scale group, in combine order, ``(QOp, wp, corr, scale)`` with the
    group's int8-dot kernel QOp (family and knobs set by the pack phase), its packed
    weights and correction as passed to that kernel, and its per-output float32
    factor ``s_g * sw``. ``columns``: the input channels the groups read, one after
    the other, in a tensor of ``x_shape`` (default: the groups' channels side by side,
    ``x`` holding nothing else). Returns ``(PrimFunc, [columns, info, meta, wp,
    corr, scale])`` (the constants to pass after the input), or None when the
    groups cannot share a kernel."""
    shared = _shared(parts)
    if shared is None or parts[0][0].kind != "matmul":
        return None
    family, mode, knobs, wps, corrs, scales, meta, modes, parts = shared
    ops = [p[0] for p in parts]
    if len({tuple(op.x_shape[:-1]) for op in ops}) != 1 or any(w.shape[2:4] != (1, 1) for w in wps):
        return None
    n = ops[0].w_shape[1]
    m = int(np.prod(ops[0].x_shape[:-1])) if len(ops[0].x_shape) > 1 else 1
    wps = [w.reshape(w.shape[1], w.shape[4], w.shape[5], w.shape[6]) for w in wps]
    x0 = meta[-1][0] + meta[-1][1]
    s0 = meta[-1][2] + meta[-1][3] * mode.kv
    wp_all = np.ascontiguousarray(np.concatenate(wps, axis=1))
    from ._groups_tir import build

    x_shape = tuple(x_shape) if x_shape is not None else tuple(ops[0].x_shape[:-1]) + (x0,)
    columns = _columns(columns, x0, x_shape[-1])
    if columns is None or x_shape[:-1] != tuple(ops[0].x_shape[:-1]):
        return None
    gather = not np.array_equal(columns, np.arange(x_shape[-1]))
    # each xs column: the x channel it reads (padding: 0), the value added (the group's
    # offset, or the fill of a padding column) and a mask (0: padding)
    lanes, info = np.zeros(s0, np.int64), np.zeros((2, s0), np.int64)
    for (g0, k, c0, cb, off, fill), md in zip(meta, modes):
        lanes[c0:c0 + k] = columns[g0:g0 + k]
        info[0, c0:c0 + cb * md.kv] = fill
        info[0, c0:c0 + k], info[1, c0:c0 + k] = off, 255
    # a whole row in one constant byte shuffle (vpermb / vpermt2b where the CPU has
    # AVX512-VBMI): ~7x the scalar gather on a 256-channel row; LLVM splits it, so
    # it stays for rows of at most 512 channels (larger ones gather element-wise)
    shuffle = gather and x_shape[-1] <= SHUFFLE_MAX
    whole = ops[0].with_(x_shape=x_shape[:-1] + (x0,), w_shape=(x0, n))  # the layer, for sizes
    # an element-wise gather costs about 4 byte copies per byte: it goes parallel sooner
    relayout = _isa.parallel_pass(whole, m * s0 * (1 if shuffle or not gather else 4))
    shuffle_lanes = [int(v) for v in lanes] if shuffle else None
    args = (mode, len(parts), m, x_shape[-1], x0, n, wp_all.shape[1], wp_all.shape[0], knobs, x_shape,
            ops[0].a_dtype, _dot, _isa.parallel_loop(whole), relayout, gather, shuffle_lanes)
    key = ("scale-groups-matmul", whole.to_json(), repr(args[:-1]), tuple(shuffle_lanes or ()))
    func = registry.cached(key, lambda: build(*args))
    func = func.with_attr(GROUPS_ATTR, json.dumps([op.to_dict() for op in ops])).with_attr("tirx.is_scheduled", True)
    if np.dtype(mode.a_dtype).itemsize == 1:
        table = (info & 255).astype(np.uint8).view(mode.a_dtype)
    else:  # int16 operands: the values as they are, the mask all ones
        table = np.stack([info[0], np.where(info[1] != 0, -1, 0)]).astype(mode.a_dtype)
    consts = [columns.astype(np.int32), table,
              np.asarray(meta, np.int32), wp_all, np.stack(corrs).astype(np.int32), np.stack(scales)]
    return func, consts


def scale_group_conv(parts, columns=None, x_shape=None):
    """:func:`scale_group_matmul` for a conv2d layer (``parts`` as there; ``columns``
    index the channels, axis 1, of an NCHW input of ``x_shape``): the int8-dot conv
    kernel with the groups' words side by side in its re-layout and their float
    terms summed in its row buffer. Returns ``(PrimFunc, [columns, fillw, meta, wp,
    corr, scale])`` or None."""
    shared = _shared(parts)
    if shared is None or parts[0][0].kind != "conv2d":
        return None
    family, mode, knobs, wps, corrs, scales, meta, _, parts = shared
    ops = [p[0] for p in parts]
    geo = {(op.x_shape[0],) + tuple(op.x_shape[2:]) + tuple(op.out_shape) + tuple(op.w_shape[2:])
           + (tuple(op.strides), tuple(op.padding), tuple(op.dilation), op.groups) for op in ops}
    if len(geo) != 1 or ops[0].groups != 1:
        return None
    x0 = meta[-1][0] + meta[-1][1]
    s0 = meta[-1][2] + meta[-1][3] * mode.kv
    n_, _, h, w = ops[0].x_shape
    x_shape = tuple(x_shape) if x_shape is not None else (n_, x0, h, w)
    columns = _columns(columns, x0, x_shape[1])
    if columns is None or x_shape != (n_, x_shape[1], h, w):
        return None
    o, _, kh, kw = ops[0].w_shape
    whole = ops[0].with_(x_shape=x_shape, w_shape=(o, x0, kh, kw))  # the layer, for sizes
    tw = -(-kw // mode.kv)  # words of one channel's taps
    taps = kw > 1 and x0 * tw < kw * sum(m[3] for m in meta) and whole.out_shape[3] >= 8 \
        and np.dtype(mode.a_dtype).itemsize == 1  # the taps re-layout moves bytes
    if taps:  # a word holds kv taps of one channel: re-pack the groups' weights
        wps, s0 = [], 0
        for m, (op, wp, corr, _) in zip(meta, parts):
            wps.append(_taps_pack(family.unpack([wp, corr], op), np.asarray(wp), mode.kv))
            m[2], m[3] = s0, m[1] * tw
            s0 += m[3] * mode.kv
    lay = dict(family.layout(ops[0]), cb=s0 // mode.kv, cgp=s0, tc=s0 // mode.kv)
    fillw = np.zeros(s0 // mode.kv, np.int64)
    for _, _, c0, cb, _, fill in meta:
        fillw[c0 // mode.kv:c0 // mode.kv + cb] = _isa.replicate_word(fill, 32 // mode.kv)
    from ._int8dot_tir import build

    groups = (len(parts), x0, tuple((m[2] // mode.kv, m[3]) for m in meta), taps)
    key = ("scale-groups-conv", whole.to_json(), mode, repr(sorted(lay.items())), repr(sorted(knobs.items())), groups)
    func = registry.cached(key, lambda: build(whole, Geometry.of(whole), mode, lay, knobs, _dot, 0, 0, groups=groups))
    func = func.with_attr(GROUPS_ATTR, json.dumps([op.to_dict() for op in ops])).with_attr("tirx.is_scheduled", True)
    consts = [columns.astype(np.int32), fillw.astype(np.int32), np.asarray(meta, np.int32),
              np.ascontiguousarray(np.concatenate(wps, axis=4)), np.stack(corrs).astype(np.int32),
              np.stack(scales)]
    return func, consts


def _taps_pack(w, packed, kv: int) -> np.ndarray:
    """Weights ``w[O, C, KH, KW]`` packed for the taps mode, ``[1, Obt, KH, 1, C * TW,
    J, VL * kv]`` (``packed``: the group's channel-mode packing, for Obt, J, VL, dtype):
    word ``c * TW + t`` lane ``i`` holds tap ``t * kv + i`` of channel ``c`` (0 past
    the last tap)."""
    o, c, kh, kw = w.shape
    _, obt, _, _, _, j, vlkv = packed.shape
    vl, tw = vlkv // kv, -(-kw // kv)
    full = np.zeros((obt * j * vl, c, tw * kv, kh), np.int64)
    full[:o, :, :kw] = np.asarray(w, np.int64).transpose(0, 1, 3, 2)
    # [Obt, J, VL, C * TW, kv, KH] -> [Obt, KH, C * TW, J, VL, kv]
    t = full.reshape(obt, j, vl, c * tw, kv, kh).transpose(0, 5, 3, 1, 2, 4)
    return np.ascontiguousarray(t.reshape(1, obt, kh, 1, c * tw, j, vlkv)).astype(packed.dtype)
