"""Phase 6: choose a kernel family per channel group and pack its weights.

Expects uniform soniq kernels (after :mod:`split_groups`) still reading int8
weights. For each, asks :func:`soniq_tvm.schedules.registry.select` for the
cheapest family on the target (or the family named by ``force``), packs the
weights at compile time into that family's layout and calls its kernel. Nothing
is repacked at run time. Non-soniq calls are left alone.

``knobs_for(op) -> (family name, knobs) | None`` (optional, from a tuning
database: :class:`soniq_tvm.tuning.TunedSchedules`) overrides the choice and sets
the family's knobs; ``None`` keeps the untuned choice. ``force`` wins over both.
An op with no knobs gets the ones its family picks for the target
(:func:`~soniq_tvm.schedules.registry.with_target_knobs`, e.g. the bit-serial
vector width) before packing; tuned knobs are kept whole.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv
from soniq_tvm.schedules import registry

from ._common import emit_qop, module_pass, soniq_call

__all__ = ["PackWeights"]


@tv.mutator
class _Packer(tv.PyExprMutator):
    def __init__(self, mod, target, force, knobs_for=None):
        super().__init__(mod)
        self.mod_ = mod
        self.target = target
        self.force = force
        self.knobs_for = knobs_for

    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = soniq_call(call, self.mod_)
        if found is None:
            return call
        op, args = found
        if op.family != "int8-ref":
            return call
        assert op.uniform, f"{op.layer}: split_groups must run before pack_weights"
        tuned = self.knobs_for(op) if self.knobs_for is not None and not self.force else None
        if tuned is not None:
            family, op = registry.get(tuned[0]), op.with_(knobs=dict(tuned[1]))
        else:
            family = registry.get(self.force) if self.force else registry.select(op, self.target)
        op = registry.with_target_knobs(family, op, self.target)
        w = tv.const_value(args[1])
        return emit_qop(self.builder_, op, args[0], family.pack(w, op), family, self.target)


def PackWeights(target=None, force: str | None = None, knobs_for=None):
    return module_pass(lambda mod: _Packer(mod, target, force, knobs_for), "soniq.PackWeights")
