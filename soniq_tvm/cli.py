"""``soniq-tvm``: a thin command line over the same functions as the Python API.

    soniq-tvm inspect model.onnx [--target T] [--json]
    soniq-tvm compile model.onnx --target T -o model.soniq [--shape x=1,3,32,32]
    soniq-tvm run model.soniq --input x.npy [-o out.npz]
    soniq-tvm verify model.onnx model.soniq

Bad input prints one line, ``error: ...``, and exits with status 2; a failed
verification exits with 1.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .errors import InputError, SoniqError

__all__ = ["main"]


def _shapes(items) -> dict | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, eq, dims = item.partition("=")
        if not eq:
            raise InputError(f"--shape {item!r} is not NAME=D1,D2,...")
        try:
            out[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise InputError(f"--shape {item!r} has a non-integer dimension") from None
    return out


def _inputs(items, specs) -> dict:
    arrays = {}
    for i, item in enumerate(items or []):
        name, eq, path = item.partition("=")
        if not eq:
            if i >= len(specs):
                raise InputError(f"more --input files than model inputs ({len(specs)})")
            name, path = specs[i]["name"], item
        try:
            arrays[name] = np.load(path)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read input file: {e}", file=path) from None
    return arrays


def _cmd_inspect(a) -> int:
    from .compiler import inspect

    plan = inspect(a.model, a.target, shapes=_shapes(a.shape))
    print(plan.to_json() if a.json else plan)
    return 0


def _cmd_compile(a) -> int:
    from .compiler import compile as _compile

    m = _compile(a.model, a.target, shapes=_shapes(a.shape), dump_ir=a.dump_ir)
    path = m.save(a.output)
    print(m.plan)
    print(f"saved {path} (compiled in {m.manifest['compile_seconds']:.1f} s)")
    return 0


def _cmd_run(a) -> int:
    from .artifact import load

    m = load(a.module)
    inputs = _inputs(a.input, m.inputs)
    if not inputs:
        from .verify import random_inputs

        inputs = random_inputs(m.inputs, a.seed)
        print(f"no --input given: random normal inputs (seed {a.seed})")
    outs = m.run(inputs)
    for spec, y in zip(m.outputs, outs):
        flat = y.reshape(-1)
        print(f"{spec['name']}: shape {list(y.shape)} {y.dtype} first {np.array2string(flat[:6], precision=4)}")
    if a.output:
        np.savez(a.output, **{spec["name"]: y for spec, y in zip(m.outputs, outs)})
        print(f"wrote {a.output}")
    if a.benchmark:
        print(f"latency: {m.benchmark(inputs)['median_ms']:.3f} ms (median)")
    return 0


def _cmd_verify(a) -> int:
    from .verify import verify

    report = verify(a.model, a.module, target=a.target, seed=a.seed)
    print(report)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soniq-tvm", description="Compile SONIQ mixed-precision ONNX models with TVM")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show the per-layer precision plan")
    s.add_argument("model")
    s.add_argument("--target", default="llvm")
    s.add_argument("--shape", action="append", help="NAME=D1,D2,... for dynamic inputs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("compile", help="compile and save a deployable module")
    s.add_argument("model")
    s.add_argument("--target", default="llvm")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--shape", action="append")
    s.add_argument("--dump-ir", help="write the IR after every pass into this directory")
    s.set_defaults(fn=_cmd_compile)

    s = sub.add_parser("run", help="run a saved module")
    s.add_argument("module")
    s.add_argument("--input", action="append", help="file.npy or NAME=file.npy")
    s.add_argument("-o", "--output", help="write outputs to this .npz")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--benchmark", action="store_true")
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("verify", help="compare a module with ONNX Runtime on the same file")
    s.add_argument("model")
    s.add_argument("module", nargs="?", help="saved module (default: compile the model now)")
    s.add_argument("--target", default="llvm")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_verify)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SoniqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
