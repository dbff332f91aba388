"""``soniq-tvm``: a thin command line over the same functions as the Python API.

    soniq-tvm inspect model.onnx [--target T] [--json]
    soniq-tvm compile model.onnx --target T -o model.soniq [--shape x=1,3,32,32] [--db tuned.db]
    soniq-tvm run model.soniq --input x.npy [-o out.npz]
    soniq-tvm verify model.onnx model.soniq
    soniq-tvm tune model.onnx --target T --db znver3.db [--trials 200] [--rpc HOST:PORT --rpc-key KEY]
    soniq-tvm db show znver3.db [--json]
    soniq-tvm db merge a.db b.db -o c.db

Bad input prints one line, ``error: ...``, and exits with status 2; a failed
verification exits with 1; an interrupted ``tune`` (Ctrl-C) exits with 130
after saving what it measured (run it again to resume).
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

    plan = inspect(a.model, a.target, shapes=_shapes(a.shape), split=a.split)
    print(plan.to_json() if a.json else plan)
    return 0


def _cmd_compile(a) -> int:
    from .compiler import compile as _compile

    m = _compile(a.model, a.target, shapes=_shapes(a.shape), dump_ir=a.dump_ir, database=a.db, strict=a.strict,
                  split=a.split)
    path = m.save(a.output)
    print(m.plan)
    print(f"saved {path} (compiled in {m.manifest['compile_seconds']:.1f} s)")
    return 0


def _cmd_convert(a) -> int:
    from .onnx_files import load_model, save_model
    from .qonnx_import import QONNX_DOMAINS, from_qonnx

    model = load_model(a.model)
    counts = {}
    for n in model.graph.node:
        if n.domain in QONNX_DOMAINS:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    if not counts:
        print(f"{a.model}: no QONNX node (Quant / BipolarQuant); nothing to convert", file=sys.stderr)
        return 1
    save_model(from_qonnx(model), a.output)
    what = ", ".join(f"{k} {n} node{'s' if n > 1 else ''}" for k, n in sorted(counts.items()))
    print(f"converted {what} to soniq-qdq/1: {a.output}")
    return 0


_SPLIT_HELP = ("auto: split mixed layers into channel groups only where that is faster on the target; "
               "always: split every mixed layer (weights packed at their real widths)")


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
    if a.profile:
        rows = m.profile(inputs)
        print(f"{'us/run':>10}  {'calls':>5}  {'share':>6}  function")
        for r in rows[: a.profile]:
            print(f"{r['us']:10.1f}  {r['calls']:5d}  {100 * r['share']:5.1f}%  {r['name']}")
        print(f"{sum(r['us'] for r in rows):10.1f}  total of {len(rows)} functions")
    return 0


def _cmd_verify(a) -> int:
    from .verify import verify

    report = verify(a.model, a.module, target=a.target, seed=a.seed)
    print(report)
    return 0 if report.ok else 1


def _cmd_tune(a) -> int:
    from .tuning.measure import MeasureConfig
    from .tuning.rpc import RPC
    from .tuning.tuner import tune

    if bool(a.rpc) != bool(a.rpc_key):
        raise InputError("--rpc and --rpc-key go together (tracker HOST:PORT and the device key)")
    rpc = RPC(a.rpc, a.rpc_key) if a.rpc else None
    measure = MeasureConfig(repeat=a.repeat, min_repeat_ms=a.min_repeat_ms, build_timeout_s=a.build_timeout,
                            run_timeout_s=a.run_timeout)
    result = tune(a.model, a.target, a.db, trials=a.trials, ms_trials=a.ms_trials, shapes=_shapes(a.shape),
                  rpc=rpc, seed=a.seed, cost_model=a.cost_model, measure=measure, progress=not a.quiet,
                  split=a.split)
    if a.json:
        import json

        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result)
    return 130 if result.interrupted else 0


def _cmd_db_show(a) -> int:
    import json

    from .tuning.database import TuningDatabase
    from .tuning.progress import fmt_us

    with TuningDatabase(a.database, create=False) as db:
        summary = db.summary()
        rows = db.best_table()
    if a.json:
        print(json.dumps({"summary": summary, "workloads": rows}, indent=1, default=str))
        return 0
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["workloads"].items())) or "none"
    print(f"{summary['path']}: {summary['format']}/{summary['version']} ({summary['writer']}), "
          f"{summary['records']} records, workloads: {kinds}")
    for fk, t in summary["targets"].items():
        print(f"\ntarget {fk}: {t['describe']}")
        print(f"  {t['records']} records ({t['failed']} failed) over {t['workloads']} workloads; "
              f"measured on {', '.join(t['machines']) or '?'}")
        print(f"  {'kind':4} {'trials':>6} {'default':>10} {'best':>10}  workload / best schedule")
        for r in (r for r in rows if r["fingerprint"] == fk):
            print(f"  {r['kind']:4} {r['trials']:>6} {fmt_us(r['default_us']):>10} {fmt_us(r['best_us']):>10}  "
                  f"{r['name'][:60]} / {r['best']}")
    return 0


def _cmd_db_merge(a) -> int:
    import os

    from .tuning.database import TuningDatabase

    if os.path.abspath(a.output) in {os.path.abspath(p) for p in a.databases}:
        raise InputError("-o must not be one of the inputs", file=a.output)
    with TuningDatabase(a.output) as out:
        n = out.merge(*a.databases)
        total = len(out)
    print(f"read {n} records from {len(a.databases)} database(s); {a.output} now holds {total} distinct records")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soniq-tvm", description="Compile SONIQ mixed-precision ONNX models with TVM")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show the per-layer precision plan")
    s.add_argument("model")
    s.add_argument("--target", default="llvm")
    s.add_argument("--shape", action="append", help="NAME=D1,D2,... for dynamic inputs")
    s.add_argument("--json", action="store_true")
    s.add_argument("--split", choices=("auto", "always"), default="auto", help=_SPLIT_HELP)
    s.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("compile", help="compile and save a deployable module")
    s.add_argument("model")
    s.add_argument("--target", default="llvm")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--shape", action="append")
    s.add_argument("--dump-ir", help="write the IR after every pass into this directory")
    s.add_argument("--db", help="tuning database to apply (records for other targets are skipped)")
    s.add_argument("--strict", action="store_true", help="with --db: a record for another target is an error")
    s.add_argument("--split", choices=("auto", "always"), default="auto", help=_SPLIT_HELP)
    s.set_defaults(fn=_cmd_compile)

    s = sub.add_parser("convert", help="convert a QONNX file (Quant / BipolarQuant nodes) to soniq-qdq/1",
                       description="Rewrite QONNX Quant and BipolarQuant nodes into annotated QuantizeLinear/"
                                   "DequantizeLinear (per-channel widths kept); compile also reads QONNX files "
                                   "directly.")
    s.add_argument("model")
    s.add_argument("output")
    s.set_defaults(fn=_cmd_convert)

    s = sub.add_parser("run", help="run a saved module")
    s.add_argument("module")
    s.add_argument("--input", action="append", help="file.npy or NAME=file.npy")
    s.add_argument("-o", "--output", help="write outputs to this .npz")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--benchmark", action="store_true")
    s.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="N",
                   help="time every function the model calls; print the N slowest (default 25)")
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("verify", help="compare a module with ONNX Runtime on the same file")
    s.add_argument("model")
    s.add_argument("module", nargs="?", help="saved module (default: compile the model now)")
    s.add_argument("--target", default="llvm")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_verify)

    s = sub.add_parser("tune", help="tune the kernels of a model for a target into a database",
                       description="Search schedules for every kernel of the model on the target, measuring each "
                                   "candidate; Ctrl-C saves what is measured, rerunning resumes.")
    s.add_argument("model")
    s.add_argument("--target", default="llvm")
    s.add_argument("--db", required=True, help="tuning database file (created if missing)")
    s.add_argument("--trials", type=int, default=200, help="candidates to measure in all (default 200)")
    s.add_argument("--ms-trials", type=int, default=None,
                   help="of which for MetaSchedule's tasks (default: what the integer kernels leave, at most half;"
                        " 0: integer kernels only)")
    s.add_argument("--rpc", help="measure on devices behind this RPC tracker, HOST:PORT")
    s.add_argument("--rpc-key", help="the device key the RPC servers registered with")
    s.add_argument("--shape", action="append")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cost-model", choices=("random", "xgb"), default="random")
    s.add_argument("--split", choices=("auto", "always"), default="auto",
                   help="as for compile: the kernels tuned are those compile makes with the same --split")
    s.add_argument("--repeat", type=int, default=3, help="timed repeats per candidate (median)")
    s.add_argument("--min-repeat-ms", type=int, default=40)
    s.add_argument("--build-timeout", type=float, default=120.0, help="seconds per build")
    s.add_argument("--run-timeout", type=float, default=60.0, help="seconds per measurement")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_tune)

    s = sub.add_parser("db", help="inspect or merge tuning databases")
    dbs = s.add_subparsers(dest="db_command", required=True)
    d = dbs.add_parser("show", help="what a tuning database holds, per target")
    d.add_argument("database")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=_cmd_db_show)
    d = dbs.add_parser("merge", help="merge databases into a new (or existing) one")
    d.add_argument("databases", nargs="+")
    d.add_argument("-o", "--output", required=True)
    d.set_defaults(fn=_cmd_db_merge)
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
