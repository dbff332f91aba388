"""The int8-dot kernel's code paths: activation re-layout, register tiles, write-back.

``test_cpu_families.py`` checks every family on awkward shapes; this file walks the
branches of the int8-dot skeleton (:mod:`soniq_tvm.schedules.cpu._int8dot_tir`)
one by one, bit-exactly against ``qop.reference``: the re-layout's vector widths
(16 / 8 pixels, transposed word blocks or strided word stores, scalar), the
strided 1x1 conv that gathers only the pixels it reads, the write-back of whole
output rows through ``VL x VL`` transposes (several rows per task, a scalar tail
for narrow images, one tile per task when there are too few tasks), the split
accumulator tiles, plus the small pure helpers and the untuned tile choice.
"""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.script import tirx as T  # noqa: E402

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.schedules.cpu import _isa  # noqa: E402
from soniq_tvm.schedules.cpu._int8dot_tir import clamp_start, rows_per_task, split_tile, subsampled  # noqa: E402
from soniq_tvm.schedules.cpu.int8dot import AVX2_DOT, AVX512_VNNI_DOT, NEON_SDOT, Geometry, relayout_cost  # noqa: E402

from test_cpu_families import AVX2, HOST, HOST_T, check, make_op, needs_avx2, needs_vnni  # noqa: E402

VNNI512 = {"avx512f", "avx512bw", "avx512vnni"} <= HOST

# (id, conv kwargs, the branch it exercises: VL = 16 for VNNI, 8 for AVX2)
PATHS = [
    ("relayout-16x16-transpose", dict(x=(1, 64, 18, 20), w=(32, 64, 3, 3), padding=(1, 1, 1, 1))),
    ("relayout-8x8-transpose", dict(x=(1, 40, 6, 11), w=(20, 40, 3, 3), padding=(1, 1, 1, 1))),
    ("relayout-strided-words", dict(x=(1, 3, 23, 19), w=(24, 3, 7, 7), strides=(2, 2), padding=(3, 3, 3, 3))),
    ("relayout-scalar-narrow", dict(x=(1, 36, 9, 5), w=(18, 36, 3, 3), padding=(2, 1, 0, 1))),
    ("channel-pad-in-words", dict(x=(1, 35, 5, 17), w=(17, 35, 3, 1), padding=(1, 0, 1, 0))),
    ("groups-channel-pad", dict(x=(1, 44, 8, 16), w=(40, 11, 3, 3), groups=4, padding=(1, 1, 1, 1))),
    ("subsampled-1x1-s2", dict(x=(1, 64, 28, 28), w=(48, 64, 1, 1), strides=(2, 2))),
    ("subsampled-1x1-s23-odd", dict(x=(2, 19, 21, 35), w=(33, 19, 1, 1), strides=(2, 3))),
    ("subsampled-groups", dict(x=(1, 32, 12, 34), w=(32, 8, 1, 1), strides=(3, 2), groups=4)),
    ("1x1-padded-not-subsampled", dict(x=(1, 16, 9, 18), w=(16, 16, 1, 1), strides=(2, 2), padding=(1, 1, 0, 0))),
    ("rows-per-task-7x7", dict(x=(1, 256, 7, 7), w=(256, 256, 3, 3), padding=(1, 1, 1, 1))),
    ("tiny-plane-scalar-tail", dict(x=(1, 64, 3, 3), w=(40, 64, 3, 3), padding=(1, 1, 1, 1))),
    ("one-tile-per-task", dict(x=(1, 16, 2, 45), w=(16, 16, 3, 3), padding=(1, 1, 1, 1))),
    ("dilated-asym", dict(x=(1, 24, 13, 30), w=(40, 24, 3, 3), dilation=(2, 3), padding=(2, 3, 2, 3))),
]


@needs_vnni
@pytest.mark.parametrize("name,kw", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("signed", [True, False])
def test_vnni_paths(name, kw, signed):
    check("x86-avx512-vnni", make_op("conv2d", 8, 8, a_signed=signed, **dict(kw)), HOST_T)


@needs_avx2
@pytest.mark.parametrize("name,kw", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("wb,ab", [(8, 8), (4, 4)])  # int16 'wide' mode (2 channels a word); 16-bit sums
def test_avx2_paths(name, kw, wb, ab):
    check("x86-avx2-dot", make_op("conv2d", wb, ab, **dict(kw)), AVX2)


@needs_vnni
@pytest.mark.parametrize("knobs", [{"R": 1, "J": 1}, {"R": 2, "J": 4}, {"R": 7, "J": 2}, {"R": 9, "J": 1},
                                   {"R": 14, "J": 2}, {"R": 16, "J": 1}, {"R": 2, "J": 8}])
def test_vnni_tiles(knobs):
    """Odd and even pixel counts (the two accumulator halves), the widest tiles."""
    op = make_op("conv2d", 8, 8, x=(1, 32, 6, 33), w=(128, 32, 3, 3), padding=(1, 1, 1, 1))
    check("x86-avx512-vnni", op.with_(knobs=knobs), HOST_T)


@needs_vnni
def test_vnni_matmul_rows_and_gemv():
    check("x86-avx512-vnni", make_op("matmul", 8, 8, x=(37, 96), w=(96, 64)), HOST_T)
    check("x86-avx512-vnni", make_op("matmul", 8, 8, a_signed=False, x=(1, 200), w=(200, 300)), HOST_T)


# ---- helpers -------------------------------------------------------------------------------------
def test_rows_per_task():
    assert rows_per_task(56, 56, 16, base_tasks=2) == 1      # a row fills a vector
    assert rows_per_task(14, 14, 16, base_tasks=16) == 2     # two rows: 28 pixels
    assert rows_per_task(7, 7, 16, base_tasks=16) == 7       # the whole 49-pixel plane
    assert rows_per_task(7, 7, 16, base_tasks=2) == 1        # ... unless that leaves < 8 tasks
    assert rows_per_task(13, 3, 16, base_tasks=8) == 13      # prime height: all rows or one


def test_split_tile_and_clamp_start():
    assert [split_tile(r) for r in (1, 2, 7, 14)] == [(1, 0), (1, 1), (4, 3), (7, 7)]
    assert [clamp_start(i, 16, 56) for i in range(4)] == [0, 16, 32, 40]  # the last block ends at the row's end
    assert [clamp_start(i, 8, 9) for i in range(2)] == [0, 1]


def test_replicate_word():
    assert _isa.replicate_word(128, 8) == -2139062144   # 0x80808080
    assert _isa.replicate_word(-128, 8) == -2139062144
    assert _isa.replicate_word(0, 8) == 0
    assert _isa.replicate_word(128, 16) == 0x00800080
    assert _isa.replicate_word(-1, 16) == -1


def test_subsampled_and_relayout_cost():
    down = make_op("conv2d", 8, 8, x=(1, 128, 28, 28), w=(256, 128, 1, 1), strides=(2, 2))
    conv = make_op("conv2d", 8, 8, x=(1, 128, 28, 28), w=(256, 128, 3, 3), strides=(2, 2), padding=(1, 1, 1, 1))
    assert subsampled(Geometry.of(down)) and not subsampled(Geometry.of(conv))
    assert relayout_cost(down, 128) == 14 * 14 * 128 / 8   # only the pixels the strided 1x1 reads
    assert relayout_cost(conv, 128) == 30 * 30 * 128 / 8


def test_default_tiles():
    """VNNI: J = 2 channel blocks and R >= 7 pixels without overlap (the measured
    best on ResNet-18); AVX2 and NEON keep the MACs-per-load rule."""
    shapes = {(56, 64): {"R": 7, "J": 2}, (28, 128): {"R": 7, "J": 2}, (7, 512): {"R": 7, "J": 2},
              (13, 64): {"R": 13, "J": 2}, (3, 64): {"R": 3, "J": 2}, (56, 16): {"R": 7, "J": 1}}
    for (w, c), want in shapes.items():
        op = make_op("conv2d", 8, 8, x=(1, c, w, w), w=(c, c, 3, 3), padding=(1, 1, 1, 1))
        assert AVX512_VNNI_DOT.knobs(op) == want, (w, c)
    assert AVX512_VNNI_DOT.knobs(make_op("matmul", 8, 8, x=(1, 4096), w=(4096, 4096))) == {"R": 1, "J": 8}
    assert AVX512_VNNI_DOT.knobs(make_op("matmul", 8, 8, x=(128, 256), w=(256, 1024))) == {"R": 8, "J": 2}
    op = make_op("conv2d", 8, 8, x=(1, 64, 56, 56), w=(64, 64, 3, 3), padding=(1, 1, 1, 1))
    assert AVX2_DOT.knobs(op) == {"R": 6, "J": 2}
    assert NEON_SDOT.knobs(op)["R"] <= 8


def test_knob_space_reaches_wide_tiles():
    op = make_op("conv2d", 8, 8, x=(1, 64, 28, 28), w=(64, 64, 3, 3), padding=(1, 1, 1, 1))
    space = AVX512_VNNI_DOT.knob_space(op, HOST_T)
    assert max(space["R"]) == 16 and space["J"] == [1, 2, 4]
    assert AVX512_VNNI_DOT.knobs(op.with_(knobs={"R": 14, "J": 2})) == {"R": 14, "J": 2}
    with pytest.raises(ValueError):
        AVX512_VNNI_DOT.knobs(op.with_(knobs={"R": 16, "J": 4}))  # 8 x 4 zmm per half: >= 1 KiB


# ---- the transposer on its own ------------------------------------------------------------------
def _transpose_kernel(lanes):
    tr = _isa.transposer(lanes)
    half = lanes // 2

    @T.prim_func
    def main(a: T.Buffer((lanes, lanes), "int32"), b: T.Buffer((lanes, lanes), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for rep in T.parallel(2):
            t0 = T.alloc_buffer((half * lanes,), "int32")
            t1 = T.alloc_buffer((half * lanes,), "int32")
            t2 = T.alloc_buffer((half * lanes,), "int32")
            t3 = T.alloc_buffer((half * lanes,), "int32")
            for k in T.unroll(half):
                t0[T.ramp(k * lanes, 1, lanes)] = a[k, T.ramp(0, 1, lanes)]
                t1[T.ramp(k * lanes, 1, lanes)] = a[half + k, T.ramp(0, 1, lanes)]
            tr(t0, t1, t2, t3)
            if rep == 0:
                for k in T.unroll(half):
                    b[k, T.ramp(0, 1, lanes)] = _isa.row(t0, k, lanes)
                    b[half + k, T.ramp(0, 1, lanes)] = _isa.row(t1, k, lanes)

    return main


@needs_avx2
@pytest.mark.parametrize("lanes", [8, 16])
def test_transposer(lanes):
    if lanes == 16 and not VNNI512:
        pytest.skip("host has no AVX-512; cross-built in test_every_family_cross_builds")
    target = HOST_T if lanes == 16 else AVX2
    lib = tvm.compile(_transpose_kernel(lanes), target=target)
    a = np.arange(lanes * lanes, dtype=np.int32).reshape(lanes, lanes)
    b = tvm.runtime.empty((lanes, lanes), "int32")
    lib["main"](tv.tensor(a), b)
    np.testing.assert_array_equal(b.numpy(), a.T)
    asm = lib.mod.inspect_source("asm")
    assert "TVMBackendAllocWorkspace" not in asm.split("__TVMBackendAllocWorkspace:")[0].split("main_compute_")[1]
