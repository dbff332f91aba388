"""Phase 10: a conv or matmul layer's activation scale groups in one kernel (``main`` only).

:mod:`fold_qdq` folds a layer whose input channels carry several steps into one
exact kernel per (step, zero point) group and a float combine, which the later
phases keep as

    t_0 = astype(call_tir(k_0, (x_0, wp_0, corr_0)), float32) * c_0
    t_g = t_(g-1) + astype(call_tir(k_g, (x_g, wp_g, corr_g)), float32) * c_g

with ``x_g`` a gather (``take``) or a slice of the layer's input ``X`` along its
channel axis (the last one of a matmul input, axis 1 of a conv's NCHW input). Where
every ``k_g`` is an int8-dot kernel that can share one tile loop
(:func:`soniq_tvm.schedules.cpu.groups.scale_group_matmul` and ``scale_group_conv``
decide, "not applicable" is ``None``), this pass replaces the whole combine with

    call_tir(scale-group kernel, (X, columns, <tables>, wp, corr, scale))  ->  float32

which gathers each group's channels of ``X`` (``columns``: ``concat(idx_g)``) while
re-laying them out for the dot products, so no gather runs outside. The kernel
performs the same float operations in the same order as the combine.

Runs on ``main`` after the cleanup, before the probes: ``soniq_probe`` returns the
kernel's input and float result, which :func:`soniq_tvm.verify` checks bit for bit
against the groups' exact integer results from the file combined in the same order.
Leaves alone: combines of other kernel families or of kernels with different tile
knobs, and everything when a family is forced.
"""
from __future__ import annotations

import json

import numpy as np

from soniq_tvm import tvm_shim as tv
from soniq_tvm.qop import QOp
from soniq_tvm.schedules.cpu.groups import GROUPS_ATTR, scale_group_conv, scale_group_matmul

from ._common import CALL_TIR, safe_name, soniq_call

__all__ = ["FuseScaleGroups", "count_fused", "group_ops", "GROUPS_PROBE"]

GROUPS_PROBE = "scale-groups"  # the probe entry kind of a scale-group kernel

_ADD, _MUL, _ASTYPE = tv.op("add"), tv.op("multiply"), tv.op("astype")
_TAKE, _SLICE = tv.op("take"), tv.op("strided_slice")


class _Chains:
    """The float combines of ``func``'s body: ``roots`` (outermost adds, original
    Call nodes) and, per root, its terms ``[(kernel call, factor constant)]``."""

    def __init__(self, mod, func):
        self.mod = mod
        self.defs = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, tv.relax.VarBinding):
                    self.defs[b.var] = b.value
        self.roots = []
        inner = []
        for value in self.defs.values():
            terms = self.chain(value)
            if terms is not None and len(terms) >= 2:
                self.roots.append((value, terms))
                inner.append(self.resolve(value.args[0]))
        self.roots = [(v, t) for v, t in self.roots if not any(v.same_as(i) for i in inner)]

    def resolve(self, expr):
        for _ in range(8):  # var -> var aliases
            if isinstance(expr, tv.relax.Var) and expr in self.defs:
                expr = self.defs[expr]
            else:
                break
        return expr

    def term(self, expr):
        v = self.resolve(expr)
        if not (isinstance(v, tv.relax.Call) and v.op == _MUL and tv.is_const(v.args[1])):
            return None
        a = self.resolve(v.args[0])
        if not (isinstance(a, tv.relax.Call) and a.op == _ASTYPE and tv.dtype_of(a) == "float32"):
            return None
        k = self.resolve(a.args[0])
        if soniq_call(k, self.mod) is None:
            return None
        return k, v.args[1]

    def chain(self, expr):
        v = self.resolve(expr)
        if not (isinstance(v, tv.relax.Call) and v.op == _ADD):
            return None
        last = self.term(v.args[1])
        if last is None:
            return None
        first = self.term(v.args[0])
        head = [first] if first is not None else self.chain(v.args[0])
        return None if head is None else head + [last]

    def source(self, expr, k: int, conv: bool):
        """``(X, channel indices)`` when ``expr`` gathers or slices ``k`` channels of a
        tensor ``X`` (along its last axis, or axis 1 of an NCHW ``conv`` input), else
        None."""
        v = self.resolve(expr)
        if not isinstance(v, tv.relax.Call):
            return None
        x = v.args[0]
        rank = len(tv.shape_of(x))
        axis = 1 if conv else rank - 1
        if v.op == _TAKE and tv.is_const(v.args[1]) and int(v.attrs.axis) % rank == axis:
            idx = tv.const_value(v.args[1]).astype(np.int64).reshape(-1)
            return (x, idx) if idx.size == k else None
        if v.op == _SLICE:
            axes, begin, end = (_ints(a) for a in v.args[1:4])
            strides = _ints(v.args[4]) if len(v.args) > 4 else [1]
            if axes is None or [a % rank for a in axes] != [axis] or not begin or not end or strides != [1]:
                return None
            idx = np.arange(begin[0], end[0])
            return (x, idx) if idx.size == k else None
        return None


def _ints(expr) -> list[int] | None:
    """The integers of a slice argument (a tuple of prim values or a shape), else None."""
    items = getattr(expr, "fields", None)
    if items is None:
        items = getattr(expr, "values", None)
    if items is None:
        return None
    try:
        return [int(getattr(i, "value", i)) for i in items]
    except (TypeError, ValueError):
        return None


class _Fuse(tv.PyExprMutator):
    def __init__(self, mod, chains: _Chains):
        super().__init__(mod)
        self.chains = chains

    def _fused(self, terms, shape):
        parts, src = [], None
        kind = soniq_call(terms[0][0], self.chains.mod)[0].kind
        conv = kind == "conv2d"
        for call, factor in terms:
            op, args = soniq_call(call, self.chains.mod)
            if op.kind != kind or len(args) != 3 or not all(tv.is_const(a) for a in args[1:]):
                return None
            found = self.chains.source(args[0], op.w_shape[1] if conv else op.w_shape[0], conv)
            if found is None or (src is not None and not found[0].same_as(src)):
                return None
            src = found[0]
            parts.append(((op, tv.const_value(args[1]), tv.const_value(args[2]), tv.const_value(factor)), found[1]))
        perm = np.concatenate([idx for _, idx in parts])
        fuse = scale_group_conv if conv else scale_group_matmul
        built = fuse([p for p, _ in parts], columns=perm, x_shape=tv.shape_of(src))
        if built is None:
            return None
        func, consts = built
        x = self.visit_expr(src)
        layer = parts[0][0][0].layer
        gv = self.builder_.add_func(func.without_attr("global_symbol"), f"soniq_{kind}_{safe_name(layer)}_groups")
        return tv.call_tir(gv, [x] + [tv.const(c) for c in consts], shape, "float32")

    def visit_call_(self, call):
        for root, terms in self.chains.roots:
            if call.same_as(root):
                fused = self._fused(terms, tv.shape_of(call))
                if fused is not None:
                    return fused
                break
        return super().visit_call_(call)


def FuseScaleGroups(target, force: str | None = None):
    """The pass (on ``main``); unchanged IR when ``force`` names a kernel family."""

    @tv.tvm.ir.transform.module_pass(opt_level=0, name="soniq.FuseScaleGroups")
    def _pass(mod, _ctx):
        if force is not None or target is None or "main" not in [gv.name_hint for gv in mod.functions]:
            return mod
        main_gv = mod.get_global_var("main")
        chains = _Chains(mod, mod[main_gv])
        if not chains.roots:
            return mod
        m = tv.mutator(_Fuse)(mod, chains)
        m.builder_.update_func(main_gv, m.visit_expr(mod[main_gv]))
        return m.builder_.get()

    return _pass


def group_ops(call, mod) -> list:
    """The group QOps of a scale-group kernel call (``[]`` for anything else)."""
    if not (isinstance(call, tv.relax.Call) and call.op == CALL_TIR):
        return []
    func = mod.functions.get(call.args[0]) if hasattr(mod.functions, "get") else None
    text = tv.prim_func_attr(func, GROUPS_ATTR) if isinstance(func, tv.PrimFunc) else None
    return [] if text is None else [QOp.from_dict(d) for d in json.loads(str(text))]


def count_fused(mod) -> int:
    """Scale-group kernel calls in ``main``."""
    found = []

    def visit(expr):
        if group_ops(expr, mod):
            found.append(1)

    if "main" in [gv.name_hint for gv in mod.functions]:
        tv.relax.analysis.post_order_visit(mod["main"].body, visit)
    return len(found)
