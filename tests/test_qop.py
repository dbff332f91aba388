"""QOp descriptor, bit-plane packing and the reference kernel families."""
from __future__ import annotations

import numpy as np
import pytest

from soniq_tvm.qop import QOp, decode_bitplanes, encode_bitplanes, reference, weight_range


def _op(kind="matmul", k=13, n=5, w_bits=3, signed=True):
    if kind == "matmul":
        return QOp("matmul", "L", (2, k), (k, n), (w_bits,) * k, (8,) * k, w_signed=signed)
    return QOp("conv2d", "L", (1, 3, 5, 5), (n, 3, 3, 3), (w_bits,) * 3, (8,) * 3, w_signed=signed)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 7, 8, 13, 64, 67])
@pytest.mark.parametrize("signed", [True, False])
def test_bitplane_round_trip(bits, k, signed, rng):
    op = _op(k=k, w_bits=bits, signed=signed)
    lo, hi = weight_range(bits, signed)
    w = rng.integers(lo, hi + 1, (k, 5))
    if signed and bits == 1:
        w = np.where(w >= 0, 1, -1)
    packed = encode_bitplanes(w, op)
    assert packed.dtype == np.uint8 and packed.shape == (5, bits, (k + 7) // 8)
    assert op.weight_bytes_bitplanes == packed.size
    np.testing.assert_array_equal(decode_bitplanes(packed, op), w.T)


def test_pack_rejects_out_of_range():
    op = _op(w_bits=2)
    with pytest.raises(ValueError, match="2-bit range"):
        encode_bitplanes(np.full((13, 5), 2), op)


def test_qop_json_round_trip():
    op = _op("conv2d").with_(strides=(2, 1), padding=(1, 0, 1, 0), group=3)
    back = QOp.from_json(op.to_json())
    assert back == op and back.out_shape == (1, 5, 3, 3)


def test_conv_reference_matches_direct_loop(rng):
    op = QOp("conv2d", "L", (1, 4, 6, 5), (6, 2, 3, 2), (8,) * 4, (8,) * 4, strides=(2, 1),
             padding=(1, 0, 2, 1), dilation=(1, 2), groups=2)
    x = rng.integers(-8, 8, op.x_shape)
    w = rng.integers(-8, 8, op.w_shape)
    out = reference(x, w, op)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))
    n, o, oh, ow = op.out_shape
    expect = np.zeros(op.out_shape, np.int64)
    for oc in range(o):
        g = oc // 3
        for y in range(oh):
            for xx in range(ow):
                for c in range(2):
                    for r in range(3):
                        for s in range(2):
                            expect[0, oc, y, xx] += xp[0, g * 2 + c, y * 2 + r, xx + s * 2] * w[oc, c, r, s]
    np.testing.assert_array_equal(out, expect)
