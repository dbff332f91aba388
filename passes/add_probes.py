"""Phase 10: a second entry point, ``soniq_probe``, for checking a built module.

Runs after every other phase, on the final Relax module. ``main`` is copied into
``soniq_probe``, which computes exactly what ``main`` computes (the same kernels,
glue and constants: the copy shares every PrimFunc) and returns, after main's
outputs, the input codes and the int32 result of every integer kernel call, in
call order (a scale-group kernel: its input codes and float result).
:func:`probe_list` says which kernel each pair belongs to (its QOp, with the file's
channel numbers of a split group), and the manifest stores it.

``soniq_tvm.verify`` uses the pairs to check a saved module layer by layer: each
kernel's result against an exact integer reference computed from the *file's*
weights and zero points, and the glue between kernels against ONNX Runtime fed
the module's own kernel results (teacher forcing). ``main`` is left untouched, so
deployment runs the same code with or without probes.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

from ._common import CALL_TIR, soniq_call
from .fuse_scale_groups import GROUPS_PROBE, group_ops

__all__ = ["PROBE_FUNC", "add_probes", "ACT_PROBE"]

PROBE_FUNC = "soniq_probe"
ACT_PROBE = {"kind": "act-matmul"}
_MATMUL = tv.op("matmul")
_THROUGH = {tv.op(n) for n in ("astype", "subtract", "reshape")}
_INT_CHAIN = {tv.op(n) for n in ("reshape", "subtract", "add")}


def _codes(expr, defs):
    """The 8-bit codes ``expr`` is computed from by casts, zero-point
    subtractions and reshapes (the earliest such tensor: a ``b - 128`` shift to
    int8 made for the kernel is looked through), else None."""
    found = None
    for _ in range(12):
        if isinstance(expr, tv.relax.Var) and expr in defs:
            expr = defs[expr]
            continue
        try:
            if tv.dtype_of(expr) in ("int8", "uint8"):
                found = expr
        except (TypeError, ValueError, AttributeError):
            return found
        if isinstance(expr, tv.relax.Call) and expr.op in _THROUGH:
            expr = expr.args[0]
            continue
        return found
    return found


def _result(var, defs, users):
    """The last int32 value of the chain ``var`` starts (reshape, zero-point
    corrections), before the float rescale."""
    for _ in range(12):
        nxt = users.get(var, [])
        if len(nxt) != 1:
            return var
        value = defs[nxt[0]]
        if not (isinstance(value, tv.relax.Call) and value.op in _INT_CHAIN):
            return var
        try:
            if tv.dtype_of(nxt[0]) != "int32":
                return var
        except (TypeError, ValueError, AttributeError):
            return var
        var = nxt[0]
    return var


def _act_matmul(value, mod, defs):
    """``(a codes, b codes)`` if ``value`` is an activation x activation matmul."""
    if not isinstance(value, tv.relax.Call):
        return None
    if value.op == _MATMUL and str(value.attrs.out_dtype) == "int32":
        args = value.args[:2]
    elif value.op == CALL_TIR:
        func = mod.functions.get(value.args[0]) if hasattr(mod.functions, "get") else None
        from soniq_tvm.schedules.cpu.actdot import ATTR

        if not isinstance(func, tv.PrimFunc) or tv.prim_func_attr(func, ATTR) is None:
            return None
        args = list(value.args[1].fields)[:2]
    else:
        return None
    a, b = _codes(args[0], defs), _codes(args[1], defs)
    return None if a is None or b is None else (a, b)


def add_probes(mod) -> tuple[object, list[dict]]:
    """``(module with soniq_probe added, [QOp dict per probed kernel call])``."""
    main = mod["main"]
    func = tv.relax.utils.copy_with_new_vars(main)
    func = tv.relax.transform.ToNonDataflow()(tv.tvm.IRModule({"probe": func}))["probe"]
    probes, exprs, defs, users = [], [], {}, {}
    for block in func.body.blocks:
        for binding in block.bindings:
            defs[binding.var] = binding.value
            if isinstance(binding.value, tv.relax.Call):
                for arg in binding.value.args:
                    if isinstance(arg, tv.relax.Var):
                        users.setdefault(arg, []).append(binding.var)
    for block in func.body.blocks:
        for binding in block.bindings:
            groups = group_ops(binding.value, mod)
            if groups:  # a scale-group kernel: its input codes and float result
                columns = tv.const_value(binding.value.args[1].fields[1]).astype(int).tolist()
                probes.append({"kind": GROUPS_PROBE, "groups": [op.to_dict() for op in groups], "columns": columns})
                exprs.extend([binding.value.args[1].fields[0], binding.var])
                continue
            found = soniq_call(binding.value, mod)
            if found is not None:
                op, args = found
                probes.append(op.to_dict())
                exprs.extend([args[0], binding.var])
                continue
            act = _act_matmul(binding.value, mod, defs)
            if act is not None:  # the result after any zero-point correction
                probes.append(dict(ACT_PROBE))
                exprs.extend([act[0], act[1], _result(binding.var, defs, users)])
    body = tv.relax.BlockBuilder().normalize(
        tv.relax.SeqExpr(func.body.blocks, tv.relax.Tuple([func.body.body, tv.relax.Tuple(exprs)])))
    probe = tv.relax.Function(func.params, body, is_pure=func.is_pure, attrs=func.attrs)
    probe = probe.with_attr("global_symbol", PROBE_FUNC)
    out = mod.clone() if hasattr(mod, "clone") else tv.tvm.IRModule(dict(mod.functions.items()))
    out[PROBE_FUNC] = probe
    out = tv.relax.transform.Normalize()(out)
    return out, probes
