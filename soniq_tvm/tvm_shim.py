"""The one place soniq-tvm touches TVM API names that moved between releases.

TVM 0.27 renamed ``tir`` to ``tirx``/``s_tir``, ``relax.Constant`` to
``tvm.ir.GenericConst``, ``struct_info`` to ``ty``, ``out_sinfo`` to ``out_ty`` and
``tvm.nd`` to ``tvm.runtime.tensor``. Everything else in the package goes through
the names below, so the next rename lands in this file only.

Importing this module imports the TVM compiler; the runtime-only loader
(:mod:`soniq_tvm.artifact`) does not import it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import tvm
from tvm import relax, te, tirx, topi  # noqa: F401  (re-exported)
from tvm import s_tir  # noqa: F401
from tvm.s_tir import dlight  # noqa: F401
from tvm.ir import Op
from tvm.relax.expr_functor import PyExprMutator, mutator  # noqa: F401
from tvm.target import Target, TargetKind  # noqa: F401

Constant = tvm.ir.GenericConst
PrimFunc = tirx.PrimFunc
# TIR expression utilities the schedule rules use (0.27 names; older TVM: BufferLoad,
# tir.stmt_functor / s_tir analysis helpers under other modules)
BufferLoad = getattr(tvm.ir.expr, "TensorLoad", None) or getattr(tvm.ir, "TensorLoad", None) or tirx.BufferLoad
sblock_realize = dlight.analysis.common_analysis.get_sblockrealize


def structural_map(node, rules):
    """Rewrite ``node`` bottom-up: ``rules`` is a list of (node class, fn) (tvm_ffi 0.1)."""
    import tvm_ffi

    return tvm_ffi.structural_map(node, rules)


def structural_walk(node, visit) -> None:
    """Call ``visit`` on every sub-node of ``node`` (tvm_ffi 0.1)."""
    import tvm_ffi

    tvm_ffi.structural_walk(node, visit)


def op(name: str):
    """A Relax operator by name, e.g. ``op("nn.conv2d")``."""
    return Op.get(f"relax.{name}")


def is_const(expr) -> bool:
    return isinstance(expr, Constant)


def const_value(expr) -> np.ndarray:
    return expr.value.numpy()


def const(array: np.ndarray):
    return relax.const(np.ascontiguousarray(array))


def tensor_type(expr):
    """The TensorType of a Relax expression (``struct_info`` before 0.27)."""
    return expr.ty


def shape_of(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def dtype_of(expr) -> str:
    return str(expr.ty.dtype)


def var_name(var) -> str:
    return var.name


def call_tir(gvar, args, out_shape, out_dtype):
    return relax.call_tir(gvar, list(args), out_ty=relax.TensorType(list(out_shape), out_dtype))


def with_call_args(call, args):
    """``call`` with other arguments (same operator, attributes and type arguments)."""
    return relax.Call(call.op, list(args), call.attrs, call.ty_args)


def tensor(array: np.ndarray, dev=None):
    return tvm.runtime.tensor(np.ascontiguousarray(array), dev or tvm.cpu())


def prim_func_attr(func, key: str):
    attrs = func.attrs
    if attrs is None or key not in attrs:
        return None
    return attrs[key]


def structural_equal(a, b) -> bool:
    import tvm_ffi

    return bool(tvm_ffi.structural_equal(a, b))


def host_cpu() -> str:
    return str(tvm.target.codegen.llvm_get_system_cpu())


def llvm_cpu_features(target) -> list[str]:
    """LLVM feature names enabled for an llvm target (its mcpu plus mattr)."""
    return sorted(str(f) for f in tvm.target.codegen.llvm_get_cpu_features(target))


def from_onnx(model, shape_dict=None, keep_params_in_input=True):
    from tvm.relax.frontend.onnx import from_onnx as _from_onnx

    return _from_onnx(model, shape_dict=shape_dict, keep_params_in_input=keep_params_in_input)


def onnx_supported_ops() -> set[str]:
    """ONNX op types TVM's importer converts (a private table of the frontend)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return set(_get_convert_map())


def cpu_pipeline_stages(target):
    """TVM's default CPU Relax pipeline as (dispatch, legalize, lower, finalize) lists."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return (cpu.library_dispatch_passes(target), cpu.legalize_passes(target),
            cpu.dataflow_lower_passes(target), cpu.finalize_passes(target))


@contextlib.contextmanager
def global_func_override(name: str, fn):
    """TVM's global function ``name`` replaced by ``fn`` while the block runs."""
    import tvm_ffi

    old = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, fn, override=True)
    try:
        yield
    finally:
        if old is not None:
            tvm_ffi.register_global_func(name, old, override=True)
