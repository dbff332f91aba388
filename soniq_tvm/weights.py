"""Weights stored at their real widths; kernel layouts rebuilt from them at load time.

An integer kernel reads its weights in its family's layout: int8 lanes for the
dot-product kernels, transformed 16-tap tiles for Winograd, bit planes for the
bit-serial kernels. Those layouts are often wider than the weights (a 2-bit
channel in an int8 lane takes 8 bits, a Winograd tile 16 bytes per 9 weights).
A compiled module therefore keeps its kernel weights out of the library: they
are parameters of ``main`` after the model inputs (the ``lift`` phase), and a
saved module stores them in ``weights.bin`` as

* **codes** (a kernel whose family can ``unpack`` its layout): the integer
  weights of the kernel, one row per channel, each row at the bits its values
  need (``lo + step * q``, ``q`` packed at ``bits`` bits: a 2-bit channel takes
  2 bits, a bipolar one 1 bit, whatever width the kernel runs at). Loading
  calls the family's ``pack`` on them, which rebuilds the kernel's layout
  exactly (checked when the module is compiled);
* **blocks** (any other integer constant): the same row codec over blocks of
  :data:`BLOCK` values;
* **raw** bytes (float constants).

This module is imported by the runtime-only loader: numpy and the kernel
families' pack functions, no compiler passes, no onnx.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np

__all__ = ["BLOCK", "WeightStore", "as_codes", "encode_rows", "decode_rows", "materialize"]

BLOCK = 256  # values per row of the block codec
_UINT = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


class _Blob:
    """Appends arrays to one byte string; each is named by ``[offset, dtype, shape]``."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, array: np.ndarray) -> list:
        a = np.ascontiguousarray(array)
        ref = [self.size, a.dtype.str, list(a.shape)]
        data = a.tobytes()
        self.parts.append(data)
        self.size += len(data)
        return ref

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _read(blob: bytes, ref) -> np.ndarray:
    offset, dtype, shape = ref
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(blob, np.dtype(dtype), count, int(offset)).reshape(shape)


def _small(values: np.ndarray) -> np.ndarray:
    """``values`` in the narrowest integer dtype that holds them."""
    if values.size == 0:
        return values.astype(np.int8)
    return values.astype(np.result_type(np.min_scalar_type(int(values.min())), np.min_scalar_type(int(values.max()))))


def _pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative ints ``q`` (< 2**bits) as a little-endian bit stream, ``bits`` each."""
    if bits == 0 or q.size == 0:
        return np.zeros(0, np.uint8)
    if 8 % bits == 0:  # 1, 2, 4, 8: whole values a byte, by shifts
        per = 8 // bits
        v = np.zeros(-(-q.size // per) * per, np.uint8)
        v[: q.size] = q.reshape(-1)
        v = v.reshape(-1, per) << np.arange(0, 8, bits, dtype=np.uint8)
        return np.bitwise_or.reduce(v, axis=1).astype(np.uint8)
    width = next(w for w in (1, 2, 4, 8) if 8 * w >= bits)
    planes = np.unpackbits(q.astype(_UINT[width]).reshape(-1, 1).view(np.uint8), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits], bitorder="little")


def _unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 0 or count == 0:
        return np.zeros(count, np.uint8)
    if 8 % bits == 0:
        v = (stream[:, None] >> np.arange(0, 8, bits, dtype=np.uint8)) & np.uint8((1 << bits) - 1)
        return v.reshape(-1)[:count]
    width = next(w for w in (1, 2, 4, 8) if 8 * w >= bits)
    planes = np.unpackbits(stream, count=count * bits, bitorder="little").reshape(count, bits)
    if bits < 8 * width:
        planes = np.concatenate([planes, np.zeros((count, 8 * width - bits), np.uint8)], axis=1)
    return np.packbits(planes, axis=1, bitorder="little").view(_UINT[width]).reshape(count)


def _rows(m: np.ndarray) -> tuple:
    """``(lo, step, q, bits)`` of each row of an integer matrix: ``m = lo + step * q``."""
    m = np.asarray(m, np.int64)
    rows, cols = m.shape
    lo = m.min(axis=1) if cols else np.zeros(rows, np.int64)
    d = m - lo[:, None]
    step = np.gcd.reduce(d, axis=1) if cols else np.ones(rows, np.int64)
    step[step == 0] = 1
    q = d // step[:, None]
    hi = q.max(axis=1) if cols else np.zeros(rows, np.int64)
    bits = np.zeros(rows, np.int64)
    for b in range(63):
        bits += (hi >> b) > 0
    return lo, step, q, bits


def encode_rows(m: np.ndarray, blob: _Blob, parts: tuple | None = None) -> dict:
    """Exact codec of an integer matrix ``m[R, C]``: row ``r`` is ``lo[r] + step[r] *
    q``, ``q`` stored at ``bits[r]`` bits (the rows of one width side by side).
    ``parts``: :func:`_rows` of ``m`` when already computed."""
    lo, step, q, bits = parts if parts is not None else _rows(m)
    rows, cols = q.shape
    data = {}
    for b in np.unique(bits):
        data[str(int(b))] = blob.add(_pack_bits(q[bits == b], int(b)))
    return {"rows": rows, "cols": cols, "lo": blob.add(_small(lo)), "step": blob.add(_small(step)),
            "bits": blob.add(bits.astype(np.uint8)), "data": data}


def decode_rows(code: dict, blob: bytes) -> np.ndarray:
    """Inverse of :func:`encode_rows` (int16 where the values fit, else int64)."""
    rows, cols = int(code["rows"]), int(code["cols"])
    bits = _read(blob, code["bits"]).astype(np.int64)
    lo = _read(blob, code["lo"]).astype(np.int64)
    step = _read(blob, code["step"]).astype(np.int64)
    top = int(bits.max(initial=0))
    # the narrowest dtype that holds every value (int16 for weight codes: half the memory traffic of int64)
    big = np.abs(lo) + step * ((1 << top) - 1)
    dt = np.int16 if int(big.max(initial=0)) < (1 << 15) else np.int64
    out = np.empty((rows, cols), dt)
    for b, ref in code["data"].items():
        sel = np.flatnonzero(bits == int(b))
        q = _unpack_bits(_read(blob, ref), int(b), sel.size * cols).reshape(sel.size, cols).astype(dt)
        if (step[sel] != 1).any():
            q *= step[sel, None].astype(dt)
        q += lo[sel, None].astype(dt)
        if sel.size == rows:
            out = q
        else:
            out[sel] = q
    return out


def _encode_codes(w: np.ndarray, blob: _Blob) -> dict:
    """A kernel's weights, one row per channel along whichever of the first two
    axes (output or input channels) stores them in fewer bytes."""
    options = []
    for axis in (0, 1)[: min(w.ndim, 2)]:
        m = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        parts = _rows(m)
        size = int(parts[3].sum()) * m.shape[1] / 8 + 3 * m.shape[0]  # data, and a few bytes a row
        options.append((size, axis, m, parts))
    _, axis, m, parts = min(options, key=lambda o: o[0])
    code = encode_rows(m, blob, parts)
    code.update(axis=axis, shape=list(w.shape))
    return code


def _decode_codes(code: dict, blob: bytes) -> np.ndarray:
    shape = list(code["shape"])
    axis = int(code["axis"])
    moved = [shape[axis]] + shape[:axis] + shape[axis + 1:]
    return np.moveaxis(decode_rows(code, blob).reshape(moved), 0, axis)


def as_codes(w: np.ndarray) -> np.ndarray:
    """Integer weights as a family's ``pack`` gets them from the compiler (int8 when they fit)."""
    w = np.asarray(w)
    fits = w.size == 0 or (w.min() >= -128 and w.max() <= 127)
    return w.astype(np.int8) if fits else w.astype(np.int64)


def _encode_blocks(a: np.ndarray, blob: _Blob) -> dict:
    flat = np.asarray(a, np.int64).reshape(-1)
    rows = max(1, -(-flat.size // BLOCK))
    padded = np.full(rows * BLOCK, flat[-1] if flat.size else 0, np.int64)
    padded[: flat.size] = flat
    return encode_rows(padded.reshape(rows, BLOCK), blob)


class WeightStore:
    """The lifted kernel weights of a module: ``arrays`` (the parameters after the
    inputs, in order, as the kernels read them) and how they are stored."""

    def __init__(self, entries: list[dict], blob: bytes, arrays: list[np.ndarray] | None = None):
        self.entries = entries
        self.blob = blob
        self._arrays = arrays
        self.load_seconds = 0.0

    # ---- building (compile time) ---------------------------------------------
    @classmethod
    def build(cls, params: list[np.ndarray], recipes: list[tuple]) -> "WeightStore":
        """``params``: the lifted constants in parameter order. ``recipes``: ``(family
        name, QOp dict, integer weights, parameter indices)`` of kernels whose layouts
        their family rebuilds from the weights (checked by the caller); every other
        parameter is stored as blocks or raw."""
        blob, entries, covered = _Blob(), [], set()
        for family, op, w, index in recipes:
            entries.append({"kind": "codes", "family": family, "op": op, "params": list(index),
                            "codes": _encode_codes(np.asarray(w), blob)})
            covered.update(index)
        for i, p in enumerate(params):
            if i in covered:
                continue
            if np.issubdtype(p.dtype, np.integer) or p.dtype == np.bool_:
                entries.append({"kind": "blocks", "params": [i], "code": _encode_blocks(p, blob)})
            else:
                entries.append({"kind": "raw", "params": [i], "data": blob.add(p)})
        for e in entries:
            e["layout"] = [[list(params[i].shape), params[i].dtype.str] for i in e["params"]]
        return cls(entries, blob.bytes(), list(params))

    # ---- figures ---------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(len(e["params"]) for e in self.entries)

    @property
    def stored_bytes(self) -> int:
        return len(self.blob)

    @property
    def memory_bytes(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
                       for e in self.entries for s, d in e["layout"]))

    def digest(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()

    def summary(self) -> dict:
        kinds = {}
        for e in self.entries:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + len(e["params"])
        return {"file": "weights.bin", "params": self.count, "stored_bytes": self.stored_bytes,
                "memory_bytes": self.memory_bytes, "by_kind": kinds, "entries": self.entries}

    # ---- loading ---------------------------------------------------------------
    def arrays(self) -> list[np.ndarray]:
        """The parameters in the kernels' layouts (rebuilt once, kept in memory)."""
        if self._arrays is None:
            t0 = time.perf_counter()
            self._arrays = materialize(self.entries, self.blob)
            self.load_seconds = time.perf_counter() - t0
        return self._arrays


def materialize(entries: list[dict], blob: bytes) -> list[np.ndarray]:
    """Every parameter of ``entries`` in its kernel layout (``ValueError`` when one
    comes out other than recorded)."""
    out: dict[int, np.ndarray] = {}
    for e in entries:
        if e["kind"] == "codes":
            from soniq_tvm.qop import QOp
            from soniq_tvm.schedules import registry

            op = QOp.from_dict(e["op"])
            arrays = registry.get(e["family"]).pack(as_codes(_decode_codes(e["codes"], blob)), op)
        elif e["kind"] == "blocks":
            shape, dtype = e["layout"][0]
            n = int(np.prod(shape, dtype=np.int64))
            arrays = [decode_rows(e["code"], blob).reshape(-1)[:n].astype(np.dtype(dtype)).reshape(shape)]
        else:
            arrays = [_read(blob, e["data"]).copy()]
        for i, a, (shape, dtype) in zip(e["params"], arrays, e["layout"]):
            a = np.asarray(a)
            if list(a.shape) != list(shape) or a.dtype.str != dtype:
                raise ValueError(f"weight parameter {i} came out {a.dtype.str}{list(a.shape)}, "
                                 f"recorded {dtype}{list(shape)}")
            out[i] = np.ascontiguousarray(a)
    return [out[i] for i in range(len(out))]
