"""Functions that run inside MetaSchedule's builder and runner worker processes.

They are pickled by reference, so a worker imports this module: it must stay
light (TVM is imported inside the functions, nothing from the compiler).

* :func:`build` is MetaSchedule's ``default_build`` without its
  ``import tvm.s_tir.tensor_intrin``, which parses every tensor intrinsic TVM ships
  (CUDA, ARM, Hexagon, ...) as TVMScript: 40-80 s per worker on a 2-core
  machine, paid again for every batch because the builder restarts its pool.
  The schedules we build carry their intrinsics inline and do not need it.
* :func:`alloc_local` / :func:`alloc_rpc` fill float inputs with random normals
  and integer inputs with zeros, so index inputs (``take``, ``gather``) stay in
  bounds; MetaSchedule's random fill crashes such kernels. Timing of the
  integer kernels does not depend on the values.
"""
from __future__ import annotations

import numpy as np


def build(mod, target, _params):
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _host_array(dtype: str, shape, rng):
    dt = np.dtype("float32" if dtype == "bfloat16" else dtype) if dtype != "bool" else np.dtype(bool)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    return np.zeros(shape, dt)


def _alloc(device, args_info, alloc_repeat, make):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            kind, dtype, shape = info[0], str(info[1]), [int(s) for s in info[2]]
            if kind != "TENSOR":
                raise NotImplementedError(f"argument kind {kind}")
            args.append(make(_host_array(dtype, shape, rng), dtype, shape, device))
        out.append(args)
    return out


def alloc_local(device, args_info, alloc_repeat):
    import tvm

    return _alloc(device, args_info, alloc_repeat, lambda a, _dt, _sh, dev: tvm.runtime.tensor(a, dev))


def alloc_rpc(session, device, args_info, alloc_repeat):  # noqa: ARG001  (RPCRunner's signature)
    import tvm

    def make(a, dtype, shape, dev):
        t = tvm.runtime.empty(shape, dtype, dev)
        t.copyfrom(a)
        return t

    return _alloc(device, args_info, alloc_repeat, make)


def _warm_then_time(rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    # one untimed call: the first call of a fresh worker starts TVM's thread pool
    # and faults the output pages in, which would be charged to the first candidate
    if repeated_args:
        rt_mod[rt_mod.entry_name](*repeated_args[0])
        device.sync()
    return run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)


def run_local(rt_mod, device, evaluator_config, repeated_args):
    return _warm_then_time(rt_mod, device, evaluator_config, repeated_args)


def run_rpc(session, rt_mod, device, evaluator_config, repeated_args):  # noqa: ARG001
    return _warm_then_time(rt_mod, device, evaluator_config, repeated_args)
