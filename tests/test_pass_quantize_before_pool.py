"""Phase 8 (``passes/quantize_before_pool.py``): max-pool the codes, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from soniq_tvm import tvm_shim as tv
from soniq_tvm.passes.quantize_before_pool import QuantizeBeforePool

SHAPE = (1, 4, 9, 11)
POOL = dict(pool_size=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1))


def _scale(c=4, sign=1.0):
    return relax.const(sign * np.array([0.5, 0.25, 0.75, 1.5][:c], np.float32))


def _zero(c=4):
    return relax.const(np.array([0, 3, 7, 128][:c], np.uint8))


def _module(pool=None, scale=None, zero=None, axis=1, second_use=False, avg=False):
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            r = bb.emit(relax.op.nn.relu(x))
            make = relax.op.nn.avg_pool2d if avg else relax.op.nn.max_pool2d
            p = bb.emit(make(r, **(pool or POOL)))
            q = bb.emit(relax.op.quantize(p, scale if scale is not None else _scale(),
                                          zero if zero is not None else _zero(), axis=axis, out_dtype="uint8"))
            out = bb.emit_output(relax.Tuple([q, p]) if second_use else q)
        bb.emit_func_output(out)
    return bb.finalize()


def _expected(pool=None, axis=1):
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            r = bb.emit(relax.op.nn.relu(x))
            q = bb.emit(relax.op.quantize(r, _scale(), _zero(), axis=axis, out_dtype="uint8"))
            out = bb.emit_output(relax.op.nn.max_pool2d(q, **(pool or POOL)))
        bb.emit_func_output(out)
    return bb.finalize()


def _inputs(rng):
    """Values on and between the quantizer's rounding ties, and past its range."""
    steps = rng.integers(-40, 600, SHAPE) / 2.0  # half steps: exact ties of round()
    jitter = rng.choice([0.0, 0.0, 1e-3, -1e-3], SHAPE)
    return ((steps + jitter) * 0.25).astype(np.float32)


def _run(mod, x):
    mod = relax.transform.DeadCodeElimination()(mod)
    ex = tvm.compile(mod, target=tv.Target({"kind": "llvm", "mcpu": tv.host_cpu()}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tv.tensor(x))
    return out.numpy()


def _pools(mod) -> list[str]:
    found = []
    tv.relax.analysis.post_order_visit(
        mod["main"].body, lambda e: found.append(str(tv.dtype_of(e.args[0]))) if isinstance(e, relax.Call)
        and isinstance(e.op, tvm.ir.Op) and e.op.name.startswith("relax.nn.") and "pool" in e.op.name else None)
    return found


@pytest.mark.parametrize("pool", [POOL, dict(pool_size=(2, 2), strides=(2, 2)),
                                  dict(pool_size=(3, 2), strides=(1, 2), padding=(2, 1, 0, 1))],
                         ids=["3x3s2p1", "2x2s2", "3x2-asym-pad"])
def test_pool_moves_after_quantize_bit_for_bit(rng, pool):
    before = _module(pool)
    after = relax.transform.CanonicalizeBindings()(relax.transform.DeadCodeElimination()(QuantizeBeforePool(before)))
    tvm.ir.assert_structural_equal(after["main"], _expected(pool)["main"])
    assert _pools(after) == ["uint8"]
    for _ in range(3):
        x = _inputs(rng)
        ref, got = _run(before, x), _run(after, x)
        assert ref.dtype == got.dtype == np.uint8
        np.testing.assert_array_equal(got, ref)
        assert len(np.unique(ref)) > 20  # the check spans many codes, saturation included
        assert (ref == 255).any()


@pytest.mark.parametrize("case", [
    dict(avg=True),                                                        # not monotone-commuting
    dict(second_use=True),                                                 # float pool still needed
    dict(scale=_scale(sign=-1.0)),                                         # decreasing quantizer
    dict(pool=dict(pool_size=(3, 3), strides=(2, 2), ceil_mode=True)),     # a window may be padding only
    dict(pool=dict(pool_size=(2, 2), strides=(1, 1), padding=(2, 0, 0, 0))),  # padding == window
    dict(pool=dict(pool_size=(3, 3), dilation=(2, 2))),
    dict(scale=relax.const(np.full(6, 0.5, np.float32)), zero=relax.const(np.zeros(6, np.uint8)), axis=3),
], ids=["avg", "second-use", "negative-scale", "ceil-mode", "pad-eq-window", "dilated", "scale-along-W"])
def test_pool_left_alone(case):
    before = _module(**case)
    after = QuantizeBeforePool(before)
    tvm.ir.assert_structural_equal(after["main"], before["main"])


def test_example_cnn_pools_codes_and_still_matches_ort():
    """End to end: the example CNN's MaxPool reads 8-bit codes after the pipeline,
    and the compiled module still equals ONNX Runtime (optimizations off)."""
    import soniq_tvm
    from soniq_tvm import models
    from soniq_tvm.compiler import prepare
    from soniq_tvm.verify import verify

    proto = models.example_cnn()
    result = prepare(proto, "llvm")[0]
    assert _pools(result.mod) == ["uint8"]
    before = prepare(proto, "llvm", stop_after="act_matmul")[0]
    assert _pools(before.mod) == ["float32"]
    m = soniq_tvm.compile(proto, "llvm")
    for seed in range(2):
        report = verify(proto, m, inputs=models.example_inputs(proto, seed=seed))
        assert report.ok, str(report)
