"""``python -m soniq_tvm.demo``: the whole job on a bundled example model.

Builds the example CNN (or transformer, ``--model transformer``) as an annotated
ONNX file, compiles it for this CPU, saves and reloads the module, checks it
against ONNX Runtime (graph optimisations off: the fake-quant reference), and
prints the precision plan and the latency next to ONNX Runtime's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _ort_latency(path: str, inputs: dict, level: str, runs: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, inputs)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, inputs)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["cnn", "transformer"], default="cnn")
    p.add_argument("--target", default="llvm")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--runs", type=int, default=50)
    a = p.parse_args(argv)

    import soniq_tvm
    from soniq_tvm import models
    from soniq_tvm.annotation import save_model
    from soniq_tvm.verify import ort_reference, verify

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    proto = models.example_cnn() if a.model == "cnn" else models.example_transformer()
    onnx_path = str(out / f"example_{a.model}.onnx")
    save_model(proto, onnx_path)
    print(f"built {onnx_path}")

    t0 = time.time()
    m = soniq_tvm.compile(onnx_path, target=a.target)
    print(f"compiled for {soniq_tvm.parse_target(a.target)} in {time.time() - t0:.1f} s\n")
    print(m.plan, "\n")
    plan = m.plan
    saved = m.save(out / f"example_{a.model}.soniq")
    m = soniq_tvm.load(saved)
    sizes = {f.name: f.stat().st_size for f in sorted(saved.iterdir())}
    print(f"saved and reloaded {saved}: " + ", ".join(f"{k} {v} B" for k, v in sizes.items()))
    print(f"  weights: {sizes.get('weights.bin', 0)} B at their real widths against {plan.bytes_before} B as int8 "
          f"and {4 * plan.bytes_before} B as fp32; rebuilt into the kernels' layouts in "
          f"{1e3 * m.weights_load_seconds:.1f} ms at load")

    inputs = models.example_inputs(proto, seed=0)
    report = verify(proto, m, inputs=inputs)  # the check the tests use: layer by layer
    ok = report.ok
    print("verify against ONNX Runtime (ORT_DISABLE_ALL), layer by layer:")
    print("  " + str(report).replace("\n", "\n  "))
    for spec, y, r in zip(m.outputs, m.run(inputs), ort_reference(proto, inputs)):
        if y.ndim == 2:
            print(f"  prediction {spec['name']}: soniq-tvm {int(y.argmax())}, ONNX Runtime {int(r.argmax())}")

    ours_ms = m.benchmark(inputs, number=max(1, a.runs // 5), repeat=5)["median_ms"]
    ref_ms = _ort_latency(onnx_path, inputs, "ORT_DISABLE_ALL", a.runs)
    opt_ms = _ort_latency(onnx_path, inputs, "ORT_ENABLE_ALL", a.runs)
    print(f"\nlatency (median, batch 1): soniq-tvm {ours_ms:.3f} ms | ONNX Runtime reference {ref_ms:.3f} ms | "
          f"ONNX Runtime optimised {opt_ms:.3f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
