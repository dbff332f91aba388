"""What a compiled model needs in memory, and the bound a compile is held to.

Two figures, from the Relax module the passes produce, before anything is built:

* **weights**: the bytes of every constant (packed weights, corrections, scales,
  gather tables), each counted once, and of the kernel weights lifted into
  parameters of ``main`` after its ``num_input`` inputs;
* **workspace**: the peak of the tensors alive at once between kernels in ``main``
  (inputs, every binding from its definition to its last use, outputs to the end).
  A kernel's own scratch (an activation re-layout, a row buffer) is not counted: it
  is at most a few times its input.

:func:`check` raises :class:`~soniq_tvm.errors.ResourceLimitError` with both figures
and the largest tensor when their sum exceeds the bound: ``memory_limit`` of
:func:`soniq_tvm.compile` (bytes), else the environment variable
``SONIQ_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix), else this machine's
physical memory.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import ResourceLimitError

__all__ = ["memory_needs", "default_limit", "parse_bytes", "check", "check_inputs"]

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text) -> int:
    """``4096``, ``"512M"``, ``"8G"``, ``"1.5T"`` -> bytes (``ValueError`` otherwise)."""
    if isinstance(text, (int, np.integer)):
        value = int(text)
    else:
        s = str(text).strip().upper().removesuffix("B").removesuffix("I")
        unit = s[-1:] if s[-1:] in _SUFFIX else ""
        value = int(float(s[: len(s) - len(unit)]) * _SUFFIX[unit])
    if value <= 0:
        raise ValueError(f"a memory bound must be positive, got {text!r}")
    return value


def default_limit() -> int:
    """``SONIQ_MEMORY_LIMIT`` if set, else this machine's physical memory."""
    env = os.environ.get("SONIQ_MEMORY_LIMIT")
    if env:
        try:
            return parse_bytes(env)
        except ValueError:
            raise ResourceLimitError(f"SONIQ_MEMORY_LIMIT={env!r} is not a byte count",
                                     hint="use e.g. 8G, 512M or a number of bytes") from None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _nbytes(ty) -> int:
    """Bytes of a tensor type with a static shape (0: unknown or symbolic)."""
    try:
        dims = [int(d) for d in ty.shape]
        itemsize = np.dtype(str(ty.dtype)).itemsize
    except (AttributeError, TypeError, ValueError):
        return 0
    return int(np.prod(dims, dtype=np.float64)) * itemsize


def memory_needs(mod) -> dict:
    """``{"weights", "workspace", "largest": (name, bytes)}`` of ``mod``'s ``main``."""
    from . import tvm_shim as tv

    relax = tv.relax
    func = mod["main"]
    consts: dict[int, int] = {}  # by object (a constant used twice counts once)

    def visit(expr):
        if tv.is_const(expr):
            consts.setdefault(hash(expr), tv.const_value(expr).nbytes)

    relax.analysis.post_order_visit(func.body, visit)
    attrs = func.attrs
    n_in = int(attrs["num_input"]) if attrs is not None and "num_input" in attrs else len(func.params)
    weights = sum(consts.values()) + sum(_nbytes(p.ty) for p in func.params[n_in:])  # lifted weights
    bindings = [b for block in func.body.blocks for b in block.bindings]
    root = {}  # an alias (``y = x``) stands for the tensor it names
    sizes = {p: _nbytes(p.ty) for p in func.params[:n_in]}
    for b in bindings:
        if isinstance(b.value, relax.Var):
            root[b.var] = root.get(b.value, b.value)
        else:
            sizes[b.var] = _nbytes(b.var.ty)
    last: dict = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            last[root.get(v, v)] = i
    for v in relax.analysis.free_vars(func.body.body):
        last[root.get(v, v)] = len(bindings)  # outputs live to the end
    freed: dict[int, int] = {}
    for v, i in last.items():
        freed[i] = freed.get(i, 0) + sizes.get(v, 0)
    live = sum(sizes[p] for p in func.params[:n_in])
    peak = live
    largest = max(((str(v.name), n) for v, n in sizes.items()), key=lambda t: t[1], default=("-", 0))
    for i, b in enumerate(bindings):
        n = sizes.get(b.var, 0)
        live += n
        peak = max(peak, live)
        if b.var not in last:  # never read
            live -= n
        live -= freed.get(i, 0)
    return {"weights": int(weights), "workspace": int(peak), "largest": largest}


def _mib(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the figure at or above 1."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check(mod, limit=None) -> dict:
    """:func:`memory_needs` of ``mod``, or :class:`ResourceLimitError` above ``limit``."""
    bound = default_limit() if limit is None else parse_bytes(limit)
    needs = memory_needs(mod)
    total = needs["weights"] + needs["workspace"]
    if total > bound:
        name, size = needs["largest"]
        raise ResourceLimitError(
            f"the model needs {_mib(total)} ({_mib(needs['weights'])} of constants, {_mib(needs['workspace'])} "
            f"of tensors alive at once; the largest, {name}, {_mib(size)}), over the bound of {_mib(bound)}",
            tensor=name, hint="check the input shapes (shapes=...), or raise memory_limit= / SONIQ_MEMORY_LIMIT")
    return needs


def check_inputs(inputs: list[dict], limit=None) -> None:
    """Refuse an input whose shape alone exceeds the bound (before the importer
    tries to fold constants of that size): ``inputs`` as in the manifest."""
    bound = default_limit() if limit is None else parse_bytes(limit)
    for i in inputs:
        try:
            n = int(np.prod([int(d) for d in i["shape"]], dtype=np.float64)) * np.dtype(i["dtype"]).itemsize
        except (TypeError, ValueError):
            continue  # symbolic
        if n > bound:
            raise ResourceLimitError(f"input shape {list(i['shape'])} alone needs {_mib(n)}, over the bound of "
                                     f"{_mib(bound)}", tensor=i["name"],
                                     hint="check shapes=..., or raise memory_limit= / SONIQ_MEMORY_LIMIT")
