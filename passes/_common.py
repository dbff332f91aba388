"""Small helpers shared by the passes (not a pass itself)."""
from __future__ import annotations

import numpy as np

from soniq_tvm import tvm_shim as tv
from soniq_tvm.qop import QOp
from soniq_tvm.schedules import registry

CALL_TIR = tv.op("call_tir")
QOP_ATTR = "soniq.qop"
PERM_PREFIX = "soniq_perm"


def module_pass(mutator_factory, name: str):
    """A module pass running ``mutator_factory(mod)`` over every Relax function."""

    @tv.tvm.ir.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        m = mutator_factory(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tv.relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        return m.builder_.get()

    return _pass


def bound_value(mutator, expr):
    """The value bound to ``expr`` in the function ``mutator`` is rewriting (or
    ``expr`` itself when it is not a bound var)."""
    if isinstance(expr, tv.relax.Var):
        value = mutator.lookup_binding(expr)
        return value if value is not None else expr
    return expr


def soniq_call(call, mod):
    """``(QOp, [args])`` if ``call`` is an ``R.call_tir`` of a soniq kernel, else None."""
    if not isinstance(call, tv.relax.Call) or call.op != CALL_TIR:
        return None
    try:
        func = mod[call.args[0].name_hint]
    except (KeyError, ValueError):  # a callee this module does not hold
        return None
    text = tv.prim_func_attr(func, QOP_ATTR) if isinstance(func, tv.PrimFunc) else None
    if text is None:
        return None
    return QOp.from_json(str(text)), list(call.args[1].fields)


def emit_qop(builder, op: QOp, x, weights: list[np.ndarray], family, target, name: str = "soniq_acc"):
    """Emit ``R.call_tir`` of ``family``'s kernel for ``op`` reading ``x`` and the
    packed ``weights`` (numpy arrays, emitted as constants); returns the var."""
    op = op.with_(family=family.name, packed_bytes=int(sum(w.nbytes for w in weights)))
    func = registry.kernel_primfunc(family, op, target).without_attr("global_symbol")
    gv = builder.add_func(func, _kernel_name(op, family.name))
    args = [x] + [tv.const(w) for w in weights]
    return builder.emit(tv.call_tir(gv, args, op.out_shape, "int32"), name)


def safe_name(name: str) -> str:
    """A layer name as an identifier fragment (kernel and gather names)."""
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


def gather_groups(builder, x, axis: int, groups: list, layer: str) -> list:
    """``[(channel indices, x's channels of that group)]``: one gather (bound to a
    ``soniq_perm*`` var, which :mod:`fold_permutations` folds into the producer
    where legal) puts the groups' channels side by side, then one slice per group.
    A single group is ``x`` itself."""
    if len(groups) == 1:
        return [(groups[0], x)]
    perm = np.concatenate(groups)
    if not np.array_equal(perm, np.arange(perm.size)):
        x = builder.emit(tv.relax.op.take(x, tv.const(perm), axis=axis), f"{PERM_PREFIX}_{safe_name(layer)}")
    parts, start = [], 0
    for idx in groups:
        end = start + len(idx)
        parts.append((idx, builder.emit(tv.relax.op.strided_slice(x, axes=[axis], begin=[start], end=[end]),
                                        "soniq_xs")))
        start = end
    return parts


def _kernel_name(op: QOp, family: str) -> str:
    safe = safe_name(op.layer)
    g = "" if op.group < 0 else f"_g{op.group}"
    return f"soniq_{op.kind}_{safe}{g}_{family.replace('-', '_')}_w{op.w_bit}a{op.a_bit}"


def per_channel(values: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """Broadcast ``values`` to ``shape`` and return one value per index of ``axis``,
    or None if the values vary along any other axis."""
    b = np.broadcast_to(values, shape)
    m = np.moveaxis(b, axis, 0).reshape(shape[axis], -1)
    if m.shape[1] and not (m == m[:, :1]).all():
        return None
    return m[:, 0].copy()
