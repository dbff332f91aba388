"""Phase 4: split each mixed-precision integer op into uniform channel groups.

Expects soniq kernels from :mod:`fold_qdq` (``int8-ref``, weights as constants).
For every op whose QOp is not uniform:

* along the reduction (per-input-channel bits, SONIQ's tied case):
  ``Y = W_lo X_lo + W_hi X_hi``, the sub-ops summed into one int32 accumulator;
* along the output channels (per-output-channel weight bits): the groups'
  outputs are concatenated;
* both, when both vary.

Splitting pays only when some kernel family computes a narrow group faster than
the wide one would (bit-serial, packed low-bit, lookup table). On an llvm target
the pass compares the cost model's estimate for the split groups, plus what the
split itself moves (gather, slices, the int32 partial-sum adds, the concat),
with the estimate for the whole op run as one group at its widest width, and
keeps the op whole when that is no slower (e.g. 2-bit and 8-bit channels on
AVX-512 VNNI, where ``vpdpbusd`` costs the same for both). Exact either way:
narrow codes are valid values of the wider width. ``merge=False`` (a forced
kernel family, or other targets) always splits.

Input channels of a group are made contiguous by permuting the weights at
compile time and gathering the activation once at run time
(``take`` bound to a var named ``soniq_perm*``); :mod:`fold_permutations` then
moves that gather into the producer where legal. Output groups are concatenated
and, when their order is not the original one, put back with a gather named
``soniq_unperm*``. Uniform ops are left unchanged.
"""
from __future__ import annotations

import numpy as np

from soniq_tvm import tvm_shim as tv
from soniq_tvm.qop import QOp
from soniq_tvm.schedules import registry

from ._common import emit_qop, gather_groups, module_pass, safe_name, soniq_call

__all__ = ["SplitChannelGroups", "channel_groups"]


def channel_groups(keys) -> list[np.ndarray]:
    """Indices of equal keys, one array per distinct key, narrowest key first."""
    keys = list(keys)
    order = sorted(set(keys), key=lambda k: tuple(-1 if v is None else v for v in k))
    return [np.array([i for i, k in enumerate(keys) if k == key], np.int64) for key in order]


@tv.mutator
class _Splitter(tv.PyExprMutator):
    def __init__(self, mod, target, merge):
        super().__init__(mod)
        self.mod_ = mod
        self.target = target
        self.merge = merge and target is not None and target.kind.name == "llvm"
        # group numbers stay unique per layer: a layer the fold already cut into
        # scale groups (numbered 0..k-1) numbers its bit-width sub-groups from k on
        self.next_group = {}
        for func in mod.functions.values():
            if isinstance(func, tv.relax.Function):
                tv.relax.analysis.post_order_visit(func.body, self._count)

    def _count(self, expr):
        found = soniq_call(expr, self.mod_)
        if found is not None:
            op = found[0]
            self.next_group[op.layer] = max(self.next_group.get(op.layer, 0), op.group + 1)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = soniq_call(call, self.mod_)
        if found is None:
            return call
        op, args = found
        if op.uniform or op.family != "int8-ref":
            return call
        x, w = args[0], tv.const_value(args[1])
        return self._split(op, x, w)

    def _split(self, op: QOp, x, w: np.ndarray):
        cin, cout = op.in_channels, op.out_channels
        in_keys = [(op.a_bits[c], op.w_bits[c] if op.w_axis == "in" else None) for c in range(cin)]
        out_keys = [(op.w_bits[o] if op.w_axis == "out" else None,) for o in range(cout)]
        in_groups, out_groups = channel_groups(in_keys), channel_groups(out_keys)
        x_axis = 1 if op.kind == "conv2d" else len(op.x_shape) - 1
        out_axis = 1 if op.kind == "conv2d" else len(op.out_shape) - 1
        if self.merge and not _split_pays(op, w, in_groups, out_groups, self.target):
            return emit_qop(self.builder_, _whole(op), x, [w], registry.get("int8-ref"), self.target, "soniq_whole")

        slices = gather_groups(self.builder_, x, x_axis, in_groups, op.layer)

        outs = []
        for oidx in out_groups:
            acc = None
            for iidx, xs in slices:
                sub_w = w[oidx][:, iidx] if op.kind == "conv2d" else w[iidx][:, oidx]
                group = self.next_group.get(op.layer, 0)
                self.next_group[op.layer] = group + 1
                sub = _sub_op(op, iidx, oidx, sub_w.shape).with_(group=group)
                part = emit_qop(self.builder_, sub, xs, [np.ascontiguousarray(sub_w)],
                                registry.get("int8-ref"), self.target, "soniq_part")
                acc = part if acc is None else self.builder_.emit(tv.relax.op.add(acc, part), "soniq_sum")
            outs.append(acc)
        if len(outs) == 1:
            return outs[0]
        cat = self.builder_.emit(tv.relax.op.concat(outs, axis=out_axis), "soniq_cat")
        order = np.concatenate(out_groups)
        if np.array_equal(order, np.arange(cout)):
            return cat
        inverse = np.argsort(order)
        return self.builder_.emit(tv.relax.op.take(cat, tv.const(inverse), axis=out_axis),
                                  f"soniq_unperm_{safe_name(op.layer)}")


def _sub_op(op: QOp, iidx: np.ndarray, oidx: np.ndarray, w_shape) -> QOp:
    """The uniform sub-op of input channels ``iidx`` and output channels ``oidx``."""
    x_shape = list(op.x_shape)
    x_shape[1 if op.kind == "conv2d" else len(x_shape) - 1] = len(iidx)
    w_bit = op.w_bits[iidx[0]] if op.w_axis == "in" else op.w_bits[oidx[0]]
    w_count = len(iidx) if op.w_axis == "in" else len(oidx)
    # channel numbers of the file: an op the fold already cut (a scale group) maps through its own
    file_in = np.asarray(op.in_index, np.int64)[iidx] if op.in_index else iidx
    file_out = np.asarray(op.out_index, np.int64)[oidx] if op.out_index else oidx
    return op.with_(x_shape=tuple(x_shape), w_shape=tuple(w_shape), a_bits=(op.a_bits[iidx[0]],) * len(iidx),
                    w_bits=(w_bit,) * w_count, in_index=tuple(int(i) for i in file_in),
                    out_index=tuple(int(o) for o in file_out))


def _whole(op: QOp) -> QOp:
    """``op`` as one uniform group at its widest widths (narrow codes are valid wide codes)."""
    return op.with_(a_bits=(op.a_bit,) * len(op.a_bits), w_bits=(op.w_bit,) * len(op.w_bits))


def _cheapest(op: QOp, target) -> float:
    fam = registry.select(op, target)
    cost = fam.cost(op, target)
    return float("inf") if cost is None else float(cost)


def _split_pays(op: QOp, w: np.ndarray, in_groups, out_groups, target) -> bool:
    """Whether the split groups are estimated faster than the whole op at its
    widest width (cost-model units: about one cycle per 8 bytes copied)."""
    x_elems = int(np.prod(op.x_shape))
    out_elems = int(np.prod(op.out_shape))
    moved = 0.0
    if len(in_groups) > 1:
        moved += 2 * x_elems / 8.0  # the gather (when not folded away) and the slices
        moved += (len(in_groups) - 1) * len(out_groups) * 3 * 4 * out_elems / 8.0  # int32 adds
    if len(out_groups) > 1:
        moved += 2 * 4 * out_elems / 8.0  # concat (and un-permute)
    tail = tuple(w.shape[2:]) if op.kind == "conv2d" else ()
    subs = [_sub_op(op, i, o, ((len(o), len(i)) + tail) if op.kind == "conv2d" else (len(i), len(o)))
            for o in out_groups for i in in_groups]
    return sum(_cheapest(sub, target) for sub in subs) + moved < _cheapest(_whole(op), target)


def SplitChannelGroups(target=None, merge: bool = True):
    return module_pass(lambda mod: _Splitter(mod, target, merge), "soniq.SplitChannelGroups")
