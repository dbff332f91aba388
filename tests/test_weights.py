"""Weights stored at their real widths (soniq_tvm.weights, passes/lift_weights.py).

The codec is exact and spends each channel's own bits; a compiled module keeps
its kernel weights out of the library; a saved module stores them in
``weights.bin`` and rebuilds the kernels' layouts when it loads, to the same
outputs bit for bit, whichever kernel family runs them.
"""
from __future__ import annotations

import numpy as np
import pytest

import soniq_tvm
from soniq_tvm import weights as W
from tests.helpers import conv_case, matmul_case


def _roundtrip(m):
    blob = W._Blob()
    code = W.encode_rows(m, blob)
    return W.decode_rows(code, blob.bytes()), blob.size


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 12, 31])
def test_codec_is_exact_and_spends_the_rows_bits(bits, rng):
    lo = -(1 << (bits - 1))
    m = rng.integers(lo, lo + (1 << bits), size=(16, 4096), dtype=np.int64)
    m[:, 0], m[:, 1] = lo, lo + (1 << bits) - 1  # both range ends in every row
    back, size = _roundtrip(m)
    assert np.array_equal(back, m)
    data = 16 * 4096 * bits / 8
    assert data <= size <= data + 16 * 3 * 8 + 64, size  # meta: a few bytes a row


def test_codec_rows_of_other_widths_steps_and_constants(rng):
    m = np.zeros((6, 300), np.int64)
    m[0] = rng.choice([-1, 1], 300)  # bipolar: 1 bit, step 2
    m[1] = rng.integers(0, 4, 300) * 6 + 100  # 2 bits, step 6, offset
    m[2] = 7  # constant: 0 bits
    m[3] = rng.integers(-128, 128, 300)  # 8 bits
    m[4] = rng.integers(-(1 << 20), 1 << 20, 300)  # 21 bits
    m[5] = rng.integers(0, 2, 300)
    back, size = _roundtrip(m)
    assert np.array_equal(back, m)
    assert size <= 300 * (1 + 2 + 0 + 8 + 21 + 1) / 8 + 6 * 20


def test_codec_fails_loudly_on_a_broken_stream(rng):
    """The round trip above can fail: a flipped data bit changes a value."""
    m = rng.integers(0, 4, size=(4, 64), dtype=np.int64)
    m[:, 0], m[:, 1] = 0, 3
    blob = W._Blob()
    code = W.encode_rows(m, blob)
    raw = bytearray(blob.bytes())
    raw[code["data"]["2"][0]] ^= 1
    assert not np.array_equal(W.decode_rows(code, bytes(raw)), m)


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def mixed():
    """A conv with channels at 2 and 8 bits (weights per output channel) and a
    matmul with bipolar and 8-bit output channels."""
    rng = np.random.default_rng(3)
    conv = conv_case(rng, 32, 48, [2] * 16 + [8] * 16, [2] * 32 + [8] * 16, w_axis=0, a_signed=False, hw=(8, 8))
    mm = matmul_case(rng, (4,), 64, 48, [8] * 64, [1] * 24 + [8] * 24, w_axis=1)
    return conv, mm


def _real_width_bytes(case, w_bits) -> float:
    per_channel = case.w[0].size if case.kind == "conv2d" else case.w.shape[0]
    return sum(per_channel * b / 8 for b in w_bits)


@pytest.mark.parametrize("split", ["always", "auto"])
def test_saved_weights_take_their_real_widths_and_reload_exactly(mixed, split, tmp_path):
    conv, _ = mixed
    m = soniq_tvm.compile(conv.model, split=split, probes=False)
    real = _real_width_bytes(conv, [2] * 32 + [8] * 16)
    sizes = m.weight_bytes
    # every kernel weight left the library; what is stored is the real widths plus
    # a few bytes a channel, whether the layer was split or kept whole at 8 bits
    assert sizes["in_memory"] > sizes["stored"]
    assert real <= sizes["stored"] <= real + 48 * 3 * 4 + 256, sizes
    assert m.plan.bytes_stored == sizes["stored"]
    assert f"{sizes['stored']} B stored at real widths" in str(m.plan)
    y = m.run(conv.x)
    path = m.save(tmp_path / "m.soniq")
    assert (path / "weights.bin").stat().st_size == sizes["stored"]
    loaded = soniq_tvm.load(path)
    assert loaded.weights_load_seconds > 0
    assert _same(loaded.run(conv.x), y)


def test_bipolar_and_8bit_matmul_channels(mixed, tmp_path):
    _, mm = mixed
    m = soniq_tvm.compile(mm.model, split="always", probes=False)
    real = _real_width_bytes(mm, [1] * 24 + [8] * 24)
    assert real <= m.weight_bytes["stored"] <= real + 48 * 3 * 4 + 256
    loaded = soniq_tvm.load(m.save(tmp_path / "mm.soniq"))
    assert _same(loaded.run(mm.x), m.run(mm.x))


@pytest.mark.parametrize("family", ["int8-ref", "bitplane-ref", "cpu-bitserial"])
def test_every_family_reloads_bit_for_bit(mixed, family, tmp_path):
    """Families with ``unpack`` store codes, the reference ones blocks; either way
    the loaded module computes what the compiled one did."""
    conv, _ = mixed
    m = soniq_tvm.compile(conv.model, family=family, probes=False)
    kinds = {e["kind"] for e in m._weights.entries}
    assert kinds and kinds <= {"codes", "blocks", "raw"}
    loaded = soniq_tvm.load(m.save(tmp_path / f"{family}.soniq"))
    assert _same(loaded.run(conv.x), m.run(conv.x))


def test_probe_entry_point_shares_the_weights(mixed, tmp_path):
    conv, _ = mixed
    m = soniq_tvm.compile(conv.model, split="always")
    outs, entries = m.probe(conv.x)
    loaded = soniq_tvm.load(m.save(tmp_path / "p.soniq"))
    outs2, entries2 = loaded.probe(conv.x)
    assert _same(outs, outs2) and len(entries) == len(entries2)
    assert all(_same(a[1:], b[1:]) for a, b in zip(entries, entries2))


def test_a_wrong_rebuild_is_refused(mixed, tmp_path):
    """If a family's pack no longer gives the recorded layout, loading says so."""
    conv, _ = mixed
    m = soniq_tvm.compile(conv.model, split="always", probes=False)
    entries = [dict(e) for e in m._weights.entries]
    codes = next(e for e in entries if e["kind"] == "codes")
    codes["layout"] = [[[1] + s, d] for s, d in codes["layout"]]
    with pytest.raises(ValueError, match="recorded"):
        W.materialize(entries, m._weights.blob)


@pytest.mark.parametrize("family", [f.name for f in __import__("soniq_tvm.schedules.registry",
                                                                   fromlist=["x"]).families()])
def test_every_family_refuses_a_bipolar_zero(family):
    """Signed 1-bit weights are -1 or +1: a 0 has no code (the bit-plane packers
    used to take it as -1), so every family's pack refuses it, and out-of-range
    weights, by name."""
    from soniq_tvm.qop import QOp
    from soniq_tvm.schedules import registry

    fam = registry.get(family)
    kw = dict(padding=(1, 1, 1, 1), groups=16) if family == "cpu-depthwise" else dict(padding=(1, 1, 1, 1))
    cin = 1 if family == "cpu-depthwise" else 16
    op = QOp("conv2d", "layer9", (1, 16, 6, 6), (16, cin, 3, 3), (1,) * 16, (2,) * 16, **kw)
    w = np.where(np.random.default_rng(0).random((16, cin, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    w[3, 0, 1, 1] = 0
    with pytest.raises(ValueError, match="layer9.*bipolar"):
        fam.pack(w, op)
    w[3, 0, 1, 1] = 2
    with pytest.raises(ValueError, match="layer9.*range"):
        fam.pack(w, op)
