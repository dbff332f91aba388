"""Phase 10: a second entry point, ``soniq_probe``, for checking a built module.

Runs after every other phase, on the final Relax module. ``main`` is copied into
``soniq_probe``, which computes exactly what ``main`` computes (the same kernels,
glue and constants: the copy shares every PrimFunc) and returns, after main's
outputs, the input codes and the int32 result of every integer kernel call, in
call order. :func:`probe_list` says which kernel each pair belongs to (its QOp,
with the file's channel numbers of a split group), and the manifest stores it.

``soniq_tvm.verify`` uses the pairs to check a saved module layer by layer: each
kernel's result against an exact integer reference computed from the *file's*
weights and zero points, and the glue between kernels against ONNX Runtime fed
the module's own kernel results (teacher forcing). ``main`` is left untouched, so
deployment runs the same code with or without probes.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

from ._common import soniq_call

__all__ = ["PROBE_FUNC", "add_probes"]

PROBE_FUNC = "soniq_probe"


def add_probes(mod) -> tuple[object, list[dict]]:
    """``(module with soniq_probe added, [QOp dict per probed kernel call])``."""
    main = mod["main"]
    func = tv.relax.utils.copy_with_new_vars(main)
    func = tv.relax.transform.ToNonDataflow()(tv.tvm.IRModule({"probe": func}))["probe"]
    probes, exprs = [], []
    for block in func.body.blocks:
        for binding in block.bindings:
            found = soniq_call(binding.value, mod)
            if found is None:
                continue
            op, args = found
            probes.append(op.to_dict())
            exprs.extend([args[0], binding.var])
    body = tv.relax.BlockBuilder().normalize(
        tv.relax.SeqExpr(func.body.blocks, tv.relax.Tuple([func.body.body, tv.relax.Tuple(exprs)])))
    probe = tv.relax.Function(func.params, body, is_pure=func.is_pure, attrs=func.attrs)
    probe = probe.with_attr("global_symbol", PROBE_FUNC)
    out = mod.clone() if hasattr(mod, "clone") else tv.tvm.IRModule(dict(mod.functions.items()))
    out[PROBE_FUNC] = probe
    out = tv.relax.transform.Normalize()(out)
    return out, probes
