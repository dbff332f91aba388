"""Phase 5: fold the channel gathers that :mod:`split_groups` inserted into producers.

Expects ``soniq_perm*`` bindings ``take(v, perm, axis)`` in front of split ops.
Where legal, the permutation moves upstream instead of being executed:

* through elementwise ops (relu, astype, clip, quantize/dequantize, and binary
  ops against constants, whose per-channel constants are permuted),
* through residual ``add``s of two tensors (pushed into both sides),
* into an ``soniq_unperm*`` gather (the two gathers compose into one),
* and finally into the soniq kernel that produces the channels, whose output
  channels are reordered by permuting its weight constant at compile time.

Every tensor on the way must have this gather as its only consumer (otherwise
another user would see permuted channels), and every branch must end in an
absorbing producer. Where either fails the gather stays, as a real run-time
gather; :func:`count_gathers` reports how many remain.
"""
from __future__ import annotations

import numpy as np

from soniq_tvm import tvm_shim as tv

from ._common import CALL_TIR, PERM_PREFIX, soniq_call

__all__ = ["FoldPermutations", "count_gathers"]

_TAKE = tv.op("take")
_UNARY = {tv.op(n) for n in ("nn.relu", "astype", "clip", "sigmoid", "tanh", "negative", "round", "nn.gelu",
                             "nn.gelu_tanh", "nn.silu", "exp", "abs", "floor", "ceil")}
_QDQ = {tv.op("quantize"), tv.op("dequantize")}
_POOL = {tv.op(n) for n in ("nn.max_pool2d", "nn.avg_pool2d", "nn.adaptive_avg_pool2d")}
_RESHAPE = tv.op("reshape")
_RETAG = "retag"  # rewrite key (_RETAG, GlobalVar): a kernel whose output channels were reordered
_BINARY = {tv.op(n) for n in ("add", "subtract", "multiply", "divide", "maximum", "minimum")}


def _const_permuted(value: np.ndarray, out_rank: int, axis: int, perm: np.ndarray) -> np.ndarray:
    cax = axis - (out_rank - value.ndim)
    if cax < 0 or value.shape[cax] == 1:
        return value
    return np.take(value, perm, axis=cax)


class _Folder:
    def __init__(self, mod, func):
        self.mod = mod
        self.defs: dict = {}
        self.uses: dict = {}
        for block in func.body.blocks:
            for b in block.bindings:
                self.defs[b.var] = b.value
                self._count(b.value)
        self._count(func.body.body)

    def _count(self, expr):
        if isinstance(expr, tv.relax.Var):
            self.uses[expr] = self.uses.get(expr, 0) + 1
        elif isinstance(expr, tv.relax.Call):
            for a in expr.args:
                self._count(a)
        elif isinstance(expr, tv.relax.Tuple):
            for f in expr.fields:
                self._count(f)
        elif isinstance(expr, tv.relax.TupleGetItem):
            self._count(expr.tuple_value)

    def push(self, var, perm: np.ndarray, axis: int, allowed_uses: int = 1):
        """Rewrites ``{var: new value}`` making ``var`` hold its channels permuted by
        ``perm`` along ``axis``, or None when that is not legal. ``allowed_uses``:
        how many consumers of ``var`` are the gathers being folded."""
        if not isinstance(var, tv.relax.Var) or self.uses.get(var, 0) != allowed_uses or var not in self.defs:
            return None
        value = self.defs[var]
        if isinstance(value, tv.relax.Var):  # an alias binding
            return self.push(value, perm, axis)
        if not isinstance(value, tv.relax.Call):
            return None
        rank = len(tv.shape_of(var))
        found = soniq_call(value, self.mod)
        if found is not None:
            op, args = found
            out_axis = 1 if op.kind == "conv2d" else rank - 1
            if axis != out_axis or op.w_axis == "out" and len(set(op.w_bits)) > 1:
                return None
            w = tv.const_value(args[1])
            w = w[perm] if op.kind == "conv2d" else w[:, perm]
            new_args = tv.relax.Tuple([args[0], tv.const(w)] + args[2:])
            # the kernel's QOp records which of the file's channels each output is
            old = np.asarray(op.out_index or range(op.out_channels), np.int64)
            gv = value.args[0]  # one call per kernel: its QOp names the layer and group
            # the retagged kernel travels with the rewrite: applied only if the whole push is
            retag = self.mod[gv].with_attr(
                "soniq.qop", op.with_(out_index=tuple(int(i) for i in old[perm])).to_json())
            return {var: tv.relax.Call(CALL_TIR, [gv, new_args], value.attrs, value.ty_args), (_RETAG, gv): retag}
        if value.op == _TAKE and var.name.startswith("soniq_unperm") and int(value.attrs.axis) % rank == axis:
            inner = tv.const_value(value.args[1])
            return {var: tv.relax.Call(_TAKE, [value.args[0], tv.const(inner[perm])], value.attrs)}
        if value.op in _UNARY or (value.op in _POOL and axis == 1 and str(value.attrs.layout) == "NCHW"):
            return self.push(value.args[0], perm, axis)
        if value.op == _RESHAPE:
            return self._push_squeeze(value.args[0], tv.shape_of(var), perm, axis)
        if value.op in _QDQ:
            new_args = [value.args[0]]
            for a in value.args[1:]:
                c = tv.const_value(a) if tv.is_const(a) else None
                if c is None:
                    return None
                if c.size > 1:
                    if int(value.attrs.axis) % rank != axis:
                        return None
                    c = np.take(c, perm, axis=0)
                new_args.append(tv.const(c))
            sub = self.push(value.args[0], perm, axis)
            if sub is None:
                return None
            sub[var] = tv.relax.Call(value.op, new_args, value.attrs)
            return sub
        if value.op in _BINARY:
            rewrites, new_args = {}, []
            for a in value.args:
                if tv.is_const(a):
                    new_args.append(tv.const(_const_permuted(tv.const_value(a), rank, axis, perm)))
                    continue
                if tv.shape_of(a) != tv.shape_of(var):
                    return None  # a broadcast operand: permuting it is not this simple
                sub = self.push(a, perm, axis)
                if sub is None:
                    return None
                rewrites.update(sub)
                new_args.append(a)
            rewrites[var] = tv.relax.Call(value.op, new_args, value.attrs)
            return rewrites
        return None


    def _push_squeeze(self, src, out_shape, perm, axis):
        """Through a reshape that only adds or drops unit dimensions around the
        channel axis (``[1, C, 1, 1] -> [1, C]``)."""
        in_shape = tv.shape_of(src)
        c = out_shape[axis]
        big = [j for j, d in enumerate(in_shape) if d != 1]
        if c == 1 or c not in in_shape or big != [in_shape.index(c)] \
                or any(d != 1 for j, d in enumerate(out_shape) if j != axis):
            return None
        return self.push(src, perm, big[0])


_SLICE = tv.op("strided_slice")


def _slices_as_gathers(folder: _Folder, gathers, src, perm: np.ndarray, axis: int) -> dict:
    """``{slice var: take(src, perm[begin:end])}`` when every use of the gathers is a
    unit-stride channel slice along ``axis``: the permuted whole is then never built."""
    slices = {v: c for v, c in folder.defs.items()
              if isinstance(c, tv.relax.Call) and c.op == _SLICE and c.args[0] in gathers}
    if not slices or sum(folder.uses.get(g, 0) for g in gathers) != len(slices):
        return {}
    out = {}
    for var, call in slices.items():
        axes, begin, end = ([int(v) for v in a] for a in call.args[1:4])
        strides = [int(v) for v in call.args[4]] if len(call.args) > 4 else [1]
        rank = len(tv.shape_of(var))
        if len(axes) != 1 or axes[0] % rank != axis or strides != [1]:
            return {}
        out[var] = tv.relax.op.take(src, tv.const(perm[begin[0]:end[0]]), axis=axis)
    return out


def _fold_function(mod, func, new_funcs: dict):
    folder = _Folder(mod, func)
    # gathers of the same tensor with the same permutation fold together (q/k/v)
    same: dict = {}
    for var, value in folder.defs.items():
        if var.name.startswith(PERM_PREFIX) and isinstance(value, tv.relax.Call) and value.op == _TAKE:
            rank = len(tv.shape_of(var))
            perm = tv.const_value(value.args[1])
            key = (value.args[0], int(value.attrs.axis) % rank, perm.tobytes())
            same.setdefault(key, (perm, []))[1].append(var)
    rewrites = {}
    for (src, axis, _), (perm, gathers) in same.items():
        sub = folder.push(src, perm, axis, allowed_uses=len(gathers))
        if sub is not None and not (set(sub) & set(rewrites)):
            rewrites.update(sub)
            rewrites.update({g: src for g in gathers})  # each gather becomes an alias
            continue
        # the gather stays: one serves every consumer (q/k/v), and where it only feeds
        # channel slices, each slice gathers its own channels straight from the source
        rewrites.update({g: gathers[0] for g in gathers[1:]})
        rewrites.update(_slices_as_gathers(folder, gathers, src, perm, axis))
    retags = [k for k in rewrites if isinstance(k, tuple) and k[0] == _RETAG]
    new_funcs.update({k[1]: rewrites.pop(k) for k in retags})
    if not rewrites:
        return func
    blocks = []
    for block in func.body.blocks:
        bindings = [tv.relax.VarBinding(b.var, rewrites.get(b.var, b.value)) for b in block.bindings]
        cls = tv.relax.DataflowBlock if isinstance(block, tv.relax.DataflowBlock) else tv.relax.BindingBlock
        blocks.append(cls(bindings))
    body = tv.relax.SeqExpr(blocks, func.body.body)
    return tv.relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)


@tv.tvm.ir.transform.module_pass(opt_level=0, name="soniq.FoldPermutations")
def FoldPermutations(mod, _ctx):
    new_funcs: dict = {}
    updates = {gv: _fold_function(mod, f, new_funcs) for gv, f in mod.functions.items()
               if isinstance(f, tv.relax.Function)}
    for gv, f in list(new_funcs.items()) + list(updates.items()):
        mod[gv] = f
    mod = tv.relax.transform.Normalize()(mod)
    return tv.relax.transform.CanonicalizeBindings()(mod)


def count_gathers(mod) -> dict[str, int]:
    """Run-time channel gathers left by the split (``soniq_perm*``/``soniq_unperm*``
    takes), per layer-name suffix."""
    found: dict[str, int] = {}
    for _gv, func in mod.functions.items():
        if not isinstance(func, tv.relax.Function):
            continue
        for block in func.body.blocks:
            for b in block.bindings:
                name = b.var.name
                if name.startswith(("soniq_perm", "soniq_unperm")) and isinstance(b.value, tv.relax.Call) \
                        and b.value.op == _TAKE:
                    key = name.split("_", 2)[-1]
                    found[key] = found.get(key, 0) + 1
    return found
