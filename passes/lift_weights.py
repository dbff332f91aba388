"""Phase 12: kernel weights become parameters of ``main``, stored at their real widths.

Runs last, on the final Relax module (``main`` and ``soniq_probe``). Every
constant an integer kernel reads (a ``soniq.qop`` or scale-group PrimFunc) moves
out of the library into a parameter after the model inputs (``num_input`` says
where they start), so a saved module can store it in its own file at the width
its values need (:mod:`soniq_tvm.weights`):

* a kernel whose family can ``unpack`` its layout back to the integer weights,
  and whose ``pack`` of those weights gives back exactly what it reads (checked
  here, per kernel), is stored as those weights: one row per channel at that
  channel's bits. Loading calls ``pack`` again;
* any other constant of at least :data:`MIN_BYTES` is stored by the block codec
  (integers) or as raw bytes (floats); smaller ones stay in the library.

Equal constants (``soniq_probe`` reads main's) become one parameter. Returns the
module and a :class:`~soniq_tvm.weights.WeightStore` whose ``arrays`` are the
parameters in order.
"""
from __future__ import annotations

import hashlib

import numpy as np

from soniq_tvm import tvm_shim as tv
from soniq_tvm.qop import QOp
from soniq_tvm.schedules import registry
from soniq_tvm.weights import WeightStore, as_codes

from ._common import soniq_call
from .fuse_scale_groups import group_ops

__all__ = ["lift_weights", "MIN_BYTES"]

MIN_BYTES = 256


def _kernel(call, mod):
    """``(QOp, [args])`` for a call of one of our kernels (QOp None for a scale-group
    kernel, whose constants have no single family to rebuild them), else None."""
    found = soniq_call(call, mod)
    if found is not None:
        return found
    return (None, list(call.args[1].fields)) if group_ops(call, mod) else None


def _recipe(op: QOp, values: list[np.ndarray]):
    """The kernel's integer weights when its family rebuilds ``values`` from them exactly."""
    try:
        family = registry.get(op.family)
        if not hasattr(family, "unpack"):
            return None
        w = as_codes(family.unpack(values, op))
        again = family.pack(w, op)
    except (KeyError, ValueError, TypeError, IndexError):
        return None
    same = len(again) == len(values) and all(
        np.asarray(a).dtype == v.dtype and np.asarray(a).shape == v.shape and np.array_equal(a, v)
        for a, v in zip(again, values))
    return w if same else None


class _Collect:
    """The constants to lift, in first-use order, keyed by content."""

    def __init__(self, mod):
        self.mod = mod
        self.keys: dict[int, tuple] = {}  # Constant object -> content key
        self.index: dict[tuple, int] = {}  # content key -> parameter index
        self.values: list[np.ndarray] = []
        self.recipes: list[tuple] = []

    def key(self, const) -> tuple:
        h = hash(const)
        if h not in self.keys:
            v = tv.const_value(const)
            self.keys[h] = (v.dtype.str, v.shape, hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest())
        return self.keys[h]

    def _param(self, const) -> int:
        k = self.key(const)
        if k not in self.index:
            self.index[k] = len(self.values)
            self.values.append(np.ascontiguousarray(tv.const_value(const)))
        return self.index[k]

    def visit(self, call) -> None:
        found = _kernel(call, self.mod)
        if found is None:
            return
        op, fields = found
        consts = fields[1:]
        if op is not None and consts and all(tv.is_const(c) for c in consts):
            known = [self.key(c) in self.index for c in consts]
            if not all(known):
                w = _recipe(op, [tv.const_value(c) for c in consts])
                if w is not None:
                    index = [self._param(c) for c in consts]
                    self.recipes.append((op.family, op.to_dict(), w, index))
                    return
        for c in consts:
            if tv.is_const(c) and tv.const_value(c).nbytes >= MIN_BYTES:
                self._param(c)


@tv.mutator
class _Substitute(tv.PyExprMutator):
    def __init__(self, mod, collect: _Collect, params: list):
        super().__init__(mod)
        self.collect = collect
        self.params = params

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if _kernel(call, self.collect.mod) is None:
            return call
        fields = list(call.args[1].fields)
        index = self.collect.index
        new = [self.params[index[self.collect.key(f)]] if tv.is_const(f) and self.collect.key(f) in index else f
               for f in fields]
        if all(a.same_as(b) for a, b in zip(new, fields)):
            return call
        return tv.with_call_args(call, [call.args[0], tv.relax.Tuple(new)] + list(call.args[2:]))


def lift_weights(mod):
    """``(module, WeightStore)``; the module unchanged when nothing is lifted."""
    funcs = [(gv, f) for gv, f in mod.functions.items() if isinstance(f, tv.relax.Function)]
    funcs.sort(key=lambda t: t[0].name_hint != "main")  # main's order first
    collect = _Collect(mod)
    for _, f in funcs:
        tv.relax.analysis.post_order_visit(f.body, collect.visit)
    store = WeightStore.build(collect.values, collect.recipes)
    if not collect.values:
        return mod, store
    for gv, f in funcs:
        params = [tv.relax.Var(f"soniq_w{i}", tv.relax.TensorType(list(v.shape), v.dtype.name))
                  for i, v in enumerate(collect.values)]
        m = _Substitute(mod, collect, params)
        body = m.visit_expr(f)
        lifted = tv.relax.Function(list(f.params) + params, body.body, f.ret_ty, f.is_pure, f.attrs)
        mod = _replace(mod, gv, lifted.with_attr("num_input", len(f.params)))
    return mod, store


def _replace(mod, gv, func):
    new = tv.tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    new[gv] = func
    return new
