"""Run every peer on every model in one process and print the side-by-side table.

::

    python -m benchmarks.run [--quick] [--models resnet18,bert,gemv] [--repeats N]
                             [--out benchmarks/results.json]

Per model: build it (seeded weights) and export fp32 ONNX; quantize it with ONNX
Runtime (static, per channel, QDQ); then time, one after another with the same
fixed input, PyTorch fp32, ORT fp32, untuned TVM fp32, ORT INT8 and the soniq
variants. ``ort_files``: soniq-tvm compiling ORT's own QDQ file, and ORT and
soniq-tvm on ORT's QOperator file; ``nbits`` (BERT, GEMV): ORT's weight-only
``MatMulNBits`` at 4 and 2 bits. Agreement is measured against ONNX Runtime with graph optimizations
off on the *same* file (the fp32 file for fp32 rows, the QDQ file for INT8 rows).
``--quick`` uses the tiny models and fewer repeats (the smoke test runs it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import models, nbits, peers
from .soniq_rows import BuildBudget, SoniqContext, soniq_variants
from .table import ORT_FP32, ORT_INT8, Row, failure, fill_paired, fill_ratios, format_markdown, format_table
from .timing import measure, settle

PEERS = ("torch", "ort_fp32", "tvm_fp32", "ort_int8", "ort_files", "nbits", "soniq")
NBITS_MODELS = ("bert", "gemv")  # MatMulNBits: matmul weights only
SONIQ_ON_QDQ = "soniq on ORT QDQ file"
CALIBRATION_SAMPLES = 8
INPUT_SEED = 1
CALIBRATION_SEED = 100


def _timed_row(
    model: str,
    variant: str,
    make: Callable[[], peers.PeerRun],
    reference: tuple[list, str, float | None] | None,
    repeats: int,
    warmup: int,
    budget_s: float | None,
    skip_over_s: float | None = None,
) -> Row:
    """Build a peer, check it against ``reference``, time it; any failure gives an n/a row."""
    try:
        run = make()
        agree = None
        if reference is not None:
            ref_outputs, ref_name, step = reference
            agree = peers.agreement(run.outputs, ref_outputs, ref_name, step)
        if skip_over_s is not None:
            t0 = time.perf_counter()
            run.fn()
            first_s = time.perf_counter() - t0
            if run.build_s + first_s > skip_over_s:
                note = (f"timing skipped: compile {run.build_s:.1f} s + first run {first_s:.1f} s "
                        f"> budget {skip_over_s:.0f} s")
                return Row(model, variant, None, agree, run.build_s, note)
        settle()  # after the reference run, as between peers
        timing = measure(run.fn, repeats, warmup, budget_s)
        return Row(model, variant, timing, agree, run.build_s, fn=run.fn)
    except Exception as exc:  # noqa: BLE001 - one failing peer must not stop the run
        return Row(model, variant, note=f"n/a: {failure(exc)}")
    finally:
        settle()


def bench_model(name: str, args, workdir: Path, soniq_budget: BuildBudget,
                log: Callable[[str], None]) -> list[Row]:
    """All rows of one model."""
    tiny = args.quick
    label = f"{name}{' (tiny)' if tiny else ''}"
    t0 = time.perf_counter()
    bm = models.build(name, workdir, tiny=tiny)
    log(f"[{label}] built and exported in {time.perf_counter() - t0:.1f} s: "
        f"{bm.onnx_path.name} {bm.input_shape}")
    x = bm.random_input(INPUT_SEED)
    calib = [bm.random_input(CALIBRATION_SEED + i) for i in range(CALIBRATION_SAMPLES)]
    fp32_ref = (peers.ort_reference(bm.onnx_path, x).outputs, "ORT_DISABLE_ALL, fp32 file", None)
    common = dict(repeats=args.repeats, warmup=args.warmup, budget_s=args.peer_budget_s)
    wanted = set(args.peers)
    rows = []

    def add(row: Row) -> None:
        rows.append(row)
        t = f"{row.timing.median_ms:.3f} ms" if row.timing else row.note
        log(f"[{label}] {row.variant}: {t}")

    if "torch" in wanted:
        add(_timed_row(label, "PyTorch fp32", lambda: peers.torch_fp32(bm.module, x), fp32_ref, **common))
    if "ort_fp32" in wanted:
        add(_timed_row(label, ORT_FP32, lambda: peers.ort_fp32(bm.onnx_path, x), fp32_ref, **common))
    if "tvm_fp32" in wanted:
        add(_timed_row(
            label, "TVM fp32 (untuned)", lambda: peers.tvm_fp32(bm.onnx_path, x), fp32_ref,
            repeats=min(args.repeats, args.tvm_repeats), warmup=1, budget_s=args.peer_budget_s,
            skip_over_s=args.tvm_budget_s,
        ))
    if "ort_int8" in wanted:
        qdq = workdir / f"{bm.onnx_path.stem}_ort_int8.onnx"
        try:
            peers.quantize_ort_int8(bm.onnx_path, qdq, calib)
            int8_ref = (peers.ort_reference(qdq, x).outputs, "ORT_DISABLE_ALL, same QDQ file",
                        peers.output_step(qdq))
            add(_timed_row(label, ORT_INT8, lambda: peers.ort_fp32(qdq, x), int8_ref, **common))
            if "ort_files" in wanted:
                add(_timed_row(label, SONIQ_ON_QDQ, lambda: peers.soniq_file(qdq, x), int8_ref, **common))
        except Exception as exc:  # noqa: BLE001
            add(Row(label, ORT_INT8, note=f"n/a: quantization failed: {failure(exc)}"))
    if "ort_files" in wanted:
        qop = workdir / f"{bm.onnx_path.stem}_ort_qoperator.onnx"
        try:
            peers.quantize_ort_int8(bm.onnx_path, qop, calib, fmt="QOperator")
            # ORT runs a QOperator file's QLinear ops on its int8 kernels even with the graph
            # optimizations off, and those saturate on AVX2-only hosts: the reference is the
            # same file rewritten as plain QDQ (float arithmetic, exact on every host)
            qop_ref = (peers.ort_reference(peers.as_qdq(qop, workdir), x).outputs,
                       "ORT_DISABLE_ALL, the QOperator file as QDQ", peers.output_step(qop))
            add(_timed_row(label, "ORT INT8 QOperator", lambda: peers.ort_fp32(qop, x), qop_ref, **common))
            add(_timed_row(label, "soniq on ORT QOperator file", lambda: peers.soniq_file(qop, x), qop_ref,
                           **common))
        except Exception as exc:  # noqa: BLE001
            add(Row(label, "ORT INT8 QOperator", note=f"n/a: quantization failed: {failure(exc)}"))
    if "nbits" in wanted and name in NBITS_MODELS:
        for bits in (4, 2):
            path = workdir / f"{bm.onnx_path.stem}_nbits{bits}.onnx"
            try:
                nbits.quantize_nbits(bm.onnx_path, path, bits)
                add(_timed_row(label, f"ORT MatMulNBits {bits}-bit", lambda p=path: peers.ort_fp32(p, x), fp32_ref,
                               **common))
            except Exception as exc:  # noqa: BLE001
                add(Row(label, f"ORT MatMulNBits {bits}-bit", note=f"n/a: {failure(exc)}"))
    if "soniq" in wanted:
        ctx = SoniqContext(bm, x, calib, workdir, args.repeats, args.warmup, args.peer_budget_s,
                           cache_dir=args.cache_dir, build_budget=soniq_budget,
                           only=tuple(re.split(r",(?![^{]*})", args.variants)) if args.variants else None)
        for row in soniq_variants(name, ctx):
            row.model = label
            add(row)
    fill_paired(rows, args.pair_rounds, args.pair_per_round, log)
    for row in rows:
        row.fn = None  # let the sessions and modules go
    return rows


# --------------------------------------------------------------------------- machine info
def _cpuinfo() -> dict:
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "cpu MHz", "flags") and key not in info:
            info[key] = value
    flags = set(info.pop("flags", "").split())
    info["isa"] = sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                  "avx512_vpopcntdq", "popcnt"})
    return info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict:
    cpu = _cpuinfo()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu.get("model name"),
        "cpu_mhz": float(cpu["cpu MHz"]) if "cpu MHz" in cpu else None,
        "cpu_isa": cpu.get("isa"),
        "cores": os.cpu_count(),
        "threads_used": peers.NUM_THREADS,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("numpy", "torch", "onnx", "onnxruntime", "tvm")},
    }
    try:
        info["tvm_host_target"] = peers.host_target()
    except Exception:  # noqa: BLE001
        info["tvm_host_target"] = None
    return info


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, 20 repeats (smoke test)")
    p.add_argument("--models", default=",".join(models.MODEL_NAMES),
                   help=f"comma-separated subset of {','.join(models.MODEL_NAMES)}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--variants", default=None,
                   help="comma-separated parts of the soniq rows' names to run (e.g. 'steps/tensor,uniform'; "
                        "'=NAME': that row exactly, commas inside {} kept; default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per peer (default 100, quick 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing (default 5)")
    p.add_argument("--tvm-repeats", type=int, default=3,
                   help="timed runs of untuned TVM fp32, which is slow (default 3)")
    p.add_argument("--peer-budget-s", type=float, default=30.0,
                   help="stop timing a peer after this many seconds (at least 3 runs; default 30)")
    p.add_argument("--tvm-budget-s", type=float, default=90.0,
                   help="skip timing untuned TVM when compile + one run exceeds this (default 90)")
    p.add_argument("--soniq-budget-s", type=float, default=420.0,
                   help="export+compile seconds the soniq rows may spend in all; later variants are "
                        "skipped (default 420)")
    p.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / ".cache",
                   help="where annotated soniq exports are kept between runs (default benchmarks/.cache)")
    p.add_argument("--no-cache", dest="cache_dir", action="store_const", const=None,
                   help="export the soniq variants afresh into the work dir")
    p.add_argument("--pair-rounds", type=int, default=None,
                   help="interleaved rounds of each row against ORT INT8 for the paired ratio (0: none; "
                        "default 15, quick 3)")
    p.add_argument("--pair-per-round", type=int, default=7,
                   help="calls of each side per paired round (default 7)")
    p.add_argument("--mcpu", default=None,
                   help="build the TVM rows (soniq, TVM fp32) for this LLVM CPU instead of the host's, e.g. "
                        "haswell for AVX2 code (it must run on this host)")
    p.add_argument("--target", default=None,
                   help="build the TVM rows for this target, e.g. \"llvm -mcpu=haswell\" for AVX2 code on an "
                        "AVX-512 host (its -mcpu is used; the same as --mcpu)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results.json"), help="JSON results file")
    p.add_argument("--workdir", type=Path, default=None, help="where ONNX files go (default: a temp dir)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.peers = [m for m in args.peers.split(",") if m]
    for m in args.models:
        if m not in models.MODEL_NAMES:
            p.error(f"unknown model {m!r}; choose from {','.join(models.MODEL_NAMES)}")
    for m in args.peers:
        if m not in PEERS:
            p.error(f"unknown peer {m!r}; choose from {','.join(PEERS)}")
    if args.repeats is None:
        args.repeats = 20 if args.quick else 100
    if args.pair_rounds is None:
        args.pair_rounds = 3 if args.quick else 15
    return args


def run(argv=None, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; print progress and the table; write and return the JSON results."""
    args = parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(peers.NUM_THREADS))  # read when TVM's pool starts
    if args.target:
        import soniq_tvm

        mcpu = soniq_tvm.parse_target(args.target).get("mcpu")
        if mcpu is None:
            raise SystemExit(f"--target {args.target!r} names no -mcpu (e.g. \"llvm -mcpu=haswell\")")
        if args.mcpu and args.mcpu != mcpu:
            raise SystemExit(f"--target says -mcpu={mcpu}, --mcpu says {args.mcpu}")
        args.mcpu = mcpu
    if args.mcpu:
        os.environ["SONIQ_BENCH_MCPU"] = args.mcpu  # peers.host_target
    started = time.perf_counter()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"note: load average {load_before[0]:.2f} before the run: other processes share the CPU, "
            "expect noisy figures")
    with tempfile.TemporaryDirectory(prefix="soniq_bench_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        soniq_budget = BuildBudget(args.soniq_budget_s)
        rows = []
        for name in args.models:
            rows += bench_model(name, args, workdir, soniq_budget, log)
    fill_ratios(rows)
    table = format_table(rows)
    log("")
    log(table)
    machine = machine_info()
    machine["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    result = {
        "machine": machine,
        "config": {
            "quick": args.quick, "models": args.models, "peers": args.peers, "repeats": args.repeats,
            "warmup": args.warmup, "tvm_repeats": args.tvm_repeats, "peer_budget_s": args.peer_budget_s,
            "tvm_budget_s": args.tvm_budget_s, "soniq_budget_s": args.soniq_budget_s,
            "soniq_build_spent_s": round(soniq_budget.spent_s, 1), "threads": peers.NUM_THREADS,
            "calibration_samples": CALIBRATION_SAMPLES, "wall_s": round(time.perf_counter() - started, 1),
        },
        "rows": [r.to_dict() for r in rows],
        "table": table,
        "markdown": format_markdown(rows),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        log(f"\nwrote {args.out}")
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
