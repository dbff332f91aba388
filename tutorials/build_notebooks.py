"""Writes the tutorial notebooks from the cell sources below: edit here, then run
``python tutorials/build_notebooks.py`` (the test suite executes the notebooks)."""
import nbformat as nbf
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))
code = lambda s: cells.append(nbf.v4.new_code_cell(s.strip()))
md("""
# Compile a SONIQ model and check it against ONNX Runtime

**You will learn** how to build a per-channel mixed-precision (`soniq-qdq/1`) ONNX file
in code, read its precision plan, compile it for this CPU, save and reload the compiled
module, check it against ONNX Runtime, and time it.

Nothing is downloaded: the model is built here from random weights.
""")
code("""
import numpy as np
import soniq_tvm
from soniq_tvm.annotation import read_annotations
from soniq_tvm.builder import QDQBuilder, choose_bits, quantize_weights
""")
md("""
## 1. An annotated model

A tiny CNN: a quantized input, a 3x3 conv whose 12 input channels are split 75 % at
2 bits and 25 % at 8 bits (weights *tied* to their input channel, as SONIQ trains them),
a ReLU, and a second conv reading 4-bit / 8-bit unsigned activations. Each precision
group of an activation has its own quantization step (a coarse one for the narrow
channels, a fine one for the 8-bit ones), as SONIQ's QAT exports them; the compiler
runs a layer's step groups in one kernel.
""")
code("""
rng = np.random.default_rng(0)
b = QDQBuilder("tutorial_cnn")
x = b.input("x", [1, 12, 16, 16])

bits1 = choose_bits(12, palette=(2, 8), low_fraction=0.75, rng=1)
# one activation step per precision group, as SONIQ's QAT exports: coarse for 2 bits, fine for 8
step1 = np.where(np.array(bits1) == 2, 0.5, 0.02).astype(np.float32)
xq = b.quant_act(x, scale=step1, bits=bits1, signed=True)
w1, s1 = quantize_weights(rng.standard_normal((16, 12, 3, 3)), bits1, axis=1)
y = b.node("Relu", [b.conv(xq, w1, s1, bits1, w_axis=1, pads=(1, 1, 1, 1))])

bits2 = choose_bits(16, palette=(4, 8), low_fraction=0.5, rng=2)
step2 = np.where(np.array(bits2) == 4, 0.4, 0.03).astype(np.float32)
yq = b.quant_act(y, scale=step2, bits=bits2, signed=False)
w2, s2 = quantize_weights(rng.standard_normal((8, 16, 3, 3)), bits2, axis=1)
b.output(b.conv(yq, w2, s2, bits2, w_axis=1, pads=(1, 1, 1, 1)), "out")
model = b.build()
print({name: ann.bits for name, ann in read_annotations(model).items() if not ann.uniform})
""")
md("""
## 2. The precision plan

`inspect` runs the compiler's passes without building. With `split="always"` every conv
is split into a 2-bit and an 8-bit channel group (a 4-bit and an 8-bit one for the
second), each group gets the kernel family that is fastest on this CPU, and the channel
permutation of the second conv is folded into the first conv's output rows. The default,
`split="auto"`, splits only where the cost model says it pays: on a CPU with AVX-512
VNNI, where 2-bit and 8-bit products cost the same instruction, a layer this small runs
whole at 8 bits (the notes say so); on an AVX2-only CPU the narrow groups get faster
kernels and it splits. The byte columns are what each family really stores: int8-dot
kernels keep one byte per weight (speed), the bit-plane family keeps each group at its
own width (size).
""")
code("""
plan = soniq_tvm.inspect(model, target="llvm", split="always")
print(plan)
assert all(len(layer.groups) == 2 for layer in plan.layers)
auto = soniq_tvm.inspect(model, target="llvm")
print(auto)
whole = [layer.name for layer in auto.layers if len(layer.groups) == 1]
assert not whole or any("run whole" in note for note in auto.notes)
small = soniq_tvm.inspect(model, target="llvm", family="bitplane-ref")
print(f"stored as bit-planes: {small.bytes_after} B instead of {small.bytes_before} B int8 "
      f"({small.compression:.1f}x smaller than fp32)")
assert small.bytes_after < small.bytes_before
""")
md("## 3. Compile, save, reload")
code("""
import tempfile, pathlib
m = soniq_tvm.compile(model, target="llvm")
path = m.save(pathlib.Path(tempfile.mkdtemp()) / "tutorial.soniq")
m = soniq_tvm.load(path)
print(m, sorted(p.name for p in path.iterdir()))
""")
md("""
## 4. Check against ONNX Runtime

The reference is ONNX Runtime with graph optimisations disabled, running the same file as
fake-quant in float. Our integer arithmetic is exact, so the codes agree.
""")
code("""
from soniq_tvm.verify import verify
inputs = {"x": rng.standard_normal((1, 12, 16, 16)).astype(np.float32)}
report = verify(model, m, inputs=inputs)
print(report)
assert report.ok
""")
md("## 5. Time it")
code("""
import onnxruntime as ort, time
lat = m.benchmark(inputs, number=20, repeat=5)["median_ms"]
so = ort.SessionOptions(); so.intra_op_num_threads = 2
sess = ort.InferenceSession(model.SerializeToString(), so)
sess.run(None, inputs)
t = []
for _ in range(50):
    t0 = time.perf_counter(); sess.run(None, inputs); t.append((time.perf_counter() - t0) * 1e3)
print(f"soniq-tvm {lat:.3f} ms, ONNX Runtime {np.median(t):.3f} ms (median, batch 1)")
""")
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
nbf.write(nb, str(__import__("pathlib").Path(__file__).with_name("01_compile_and_verify.ipynb")))

# ---- 03: tuning, and reusing the records on another machine -------------------------------
cells = []
md("""
# Tune a model, then reuse the records in a fresh process

**You will learn** how to tune the kernels of a model for this CPU into a database file,
what the database holds, how a compile in another process (or on another machine with
the same target) uses it without tuning, how a database tuned for another CPU is
refused, and what the tuning bought.

The model is the package's example CNN (random weights, nothing downloaded). The budget
is small (24 candidates, measured briefly) so that the notebook runs in about a minute
on 2 cores; real runs use a few hundred.
""")
code("""
import json, pathlib, subprocess, sys, tempfile
import numpy as np
import onnx
import soniq_tvm
from soniq_tvm.models import example_cnn
from soniq_tvm.tuning import MeasureConfig, TuningDatabase

work = pathlib.Path(tempfile.mkdtemp())
model_path = str(work / "cnn.onnx")
onnx.save(example_cnn(seed=0, palette=(2, 8), low_fraction=0.75, image=32, channels=(32, 64)), model_path)
x = {"x": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
""")
md("""
## 1. Tune

`split="always"` tunes the split channel groups (a 2-bit and an 8-bit kernel per layer),
the kernels `compile(..., split="always")` builds. Each integer kernel's candidates are
the kernel families that can run it and their knobs; 8 of the 24 trials go to
MetaSchedule on the float glue. Every candidate is checked against the untuned kernel's
output before it is timed.
""")
code("""
db = str(work / "host.db")
result = soniq_tvm.tune(model_path, "llvm", db, trials=24, ms_trials=8, split="always", progress=False,
                        measure=MeasureConfig(repeat=3, min_repeat_ms=5))
print(result)
assert 0 < result.measured <= 24 and not result.interrupted
""")
md("""
## 2. What the database holds

One SQLite file: the workloads, and per target fingerprint (the LLVM CPU and its ISA
features) every measured candidate. `soniq-tvm db show host.db` prints the same.
""")
code("""
with TuningDatabase(db, create=False) as d:
    summary = d.summary()
fingerprint, target = next(iter(summary["targets"].items()))
print(f"{summary['records']} records over {sum(summary['workloads'].values())} workloads "
      f"({summary['workloads']}); tuned for {target['describe']}")
assert summary["records"] >= sum(summary["workloads"].values())  # every workload measured
""")
md("""
## 3. Compile in a fresh process, with the records and no tuning

This is what a second machine with the same CPU does with a copied database:
`strict=True` makes a record that cannot be applied an error instead of a warning.
""")
code('''
code = f"""
import json, time, soniq_tvm
t = time.time()
m = soniq_tvm.compile({model_path!r}, "llvm", database={db!r}, strict=True, split="always")
print(json.dumps({{"seconds": time.time() - t, "tuning": m.manifest["tuning"]}}))
"""
out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
fresh = json.loads(out.strip().splitlines()[-1])
applied = fresh["tuning"]["applied"]
print(f"compiled in {fresh['seconds']:.1f} s with {len(applied)} tuned schedules, skipped: {fresh['tuning']['skipped']}")
for a in applied[:6]:
    print(f"  {a['where']:16} {a['schedule']}")
assert sum(a["kind"] == "qop" for a in applied) >= 10 and not fresh["tuning"]["skipped"]
''')
md("""
## 4. A database tuned for another CPU is refused

Records carry the fingerprint of the target they were measured on. Compiling for a
different CPU skips them (a `TuningWarning`, and a note in the plan); with
`strict=True` it is a `TuningDatabaseError` naming the file and what differs.
""")
code("""
from soniq_tvm import TuningDatabaseError

other = "skylake-avx512" if "znver3" in target["describe"] else "znver3"
try:
    soniq_tvm.inspect(model_path, f"llvm -mcpu={other}", database=db, strict=True, split="always")
    raise AssertionError("a foreign database was applied")
except TuningDatabaseError as e:
    message = str(e)
print("\\n".join(message.splitlines()[:3]))
assert db in message and f"!= {other}" in message
""")
md("""
## 5. What tuning bought

The same model compiled with and without the database computes the same numbers (every
candidate was checked against the untuned kernel). Per kernel, the default schedule's
time against the best one measured: where another family or knob setting won (often
integer Winograd on a 2-bit group, which the untuned cost model may rank just behind
the int8-dot kernel), the tuned module uses it. On a model this small the whole-model
difference is within the noise of a shared machine.
""")
code("""
untuned = soniq_tvm.compile(model_path, "llvm", split="always")
tuned = soniq_tvm.compile(model_path, "llvm", database=db, split="always")
np.testing.assert_array_equal(untuned.run(x)[0], tuned.run(x)[0])
before, after = [], []
for _ in range(7):  # alternate: the machine is shared
    before.append(untuned.benchmark(x, number=50, repeat=3)["median_ms"])
    after.append(tuned.benchmark(x, number=50, repeat=3)["median_ms"])
print(f"whole model: untuned {np.median(before):.3f} ms, tuned {np.median(after):.3f} ms")

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
tasks = [t for t in result.tasks if t.default_us and t.best_us]
fig, ax = plt.subplots(figsize=(9, 3.2))
pos = np.arange(len(tasks))
ax.bar(pos - 0.2, [t.default_us for t in tasks], 0.4, label="default schedule")
ax.bar(pos + 0.2, [t.best_us for t in tasks], 0.4, label="best measured")
ax.set_xticks(pos, [t.name.split(" (")[-1].rstrip(")")[:14] for t in tasks], rotation=60, fontsize=7)
ax.set_ylabel("us per call"); ax.legend(); ax.set_title("kernel latency before and after tuning")
fig.tight_layout()
plt.show()
assert all(t.best_us <= t.default_us * 1.0001 for t in tasks)
""")
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
nbf.write(nb, str(__import__("pathlib").Path(__file__).with_name("03_tuning_and_reuse.ipynb")))

# ---- 02: from QAT to a deployed module -----------------------------------------------------
cells = []
md("""
# From quantization-aware training to a deployed module

**You will learn** the whole path a SONIQ model takes: train a small CNN in fp32 on real
data (scikit-learn's handwritten digits, 1,797 8x8 images, installed with scikit-learn),
quantize it with per-channel mixed precision and hardware-calibrated noise under a bit
budget, export the annotated ONNX file, compile it, check it against ONNX Runtime, and
compare accuracies. Two palettes: `{2,8}` and `{1,4}` bits, both at 8x or more weight
compression against fp32.

Needs the `torch` extra. About a minute of training on 2 cores.
""")
code("""
import pathlib, tempfile
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
import soniq_tvm
from soniq_tvm.torch import average_bits, bit_penalty, export_onnx, prepare, snap

d = load_digits()
x = (d.images.astype(np.float32) / 16.0)[:, None]
xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, random_state=0, stratify=d.target)
xtr, xte = torch.from_numpy(xtr), torch.from_numpy(xte)
ytr, yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
print(f"{len(xtr)} training images, {len(xte)} test images")
""")
md("## 1. The fp32 model")
code("""
def train(model, epochs, lr, seed, penalty=False, batch=64):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(xtr) + batch - 1) // batch))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            if penalty:  # the bit budget: penalises average precision above the target
                loss = loss + bit_penalty(model)
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()

def accuracy(model):
    model.eval()
    with torch.no_grad():
        return float((model(xte).argmax(1) == yte).float().mean())

torch.manual_seed(0)
fp32 = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 2 * 2, 10))
train(fp32, epochs=30, lr=3e-3, seed=0)
acc_fp32 = accuracy(fp32)
print(f"fp32 test accuracy {acc_fp32:.2%}")
assert acc_fp32 >= 0.97
""")
md("""
## 2. SONIQ QAT

`prepare` replaces each conv and linear layer by one whose every input channel learns
a continuous precision between the palette's two widths while training sees the
quantization noise of that precision; `bit_penalty` holds the average to the budget.
`snap` then fixes each channel at a palette width (fitting the budget), and a second
phase fine-tunes with straight-through quantization at those widths.
""")
code("""
runs = {}
for name, palette, budget in (("{2,8}", (2, 8), 3.5), ("{1,4}", (1, 4), 3.0)):
    torch.manual_seed(0)
    q = prepare(fp32.eval(), palette=palette, target_bits=budget)
    train(q, epochs=20, lr=2e-3, seed=0, penalty=True)
    snap(q)
    train(q, epochs=20, lr=2e-3, seed=1)
    runs[name] = q
    print(f"{name}: {average_bits(q):.2f} bits per weight ({32 / average_bits(q):.1f}x smaller than fp32), "
          f"test accuracy {accuracy(q):.2%}")
""")
md("""
## 3. Export, compile, check against ONNX Runtime

`export_onnx` writes the `soniq-qdq/1` file: a plain QDQ model that ONNX Runtime runs,
with each channel's width in the node metadata. The whole test set is one batch.
`verify` runs the file in ONNX Runtime (graph optimisations off: the reference) and the
compiled module on the same input, layer by layer.
""")
code("""
from soniq_tvm.verify import verify

work = pathlib.Path(tempfile.mkdtemp())
rows = [("fp32 (PyTorch)", 32.0, acc_fp32, None)]
compiled = {}
for name, q in runs.items():
    path = work / f"digits_{name.strip('{}').replace(',', '_')}.onnx"
    export_onnx(q, xte, path)
    m = soniq_tvm.compile(path, target="llvm")
    report = verify(path, m, inputs={"x": xte.numpy()})
    print(f"{name}: " + str(report).splitlines()[0])
    assert report.ok
    logits = m.run({"x": xte.numpy()})[0]
    acc = float((logits.argmax(1) == yte.numpy()).mean())
    rows.append((f"{name} (compiled)", average_bits(q), acc, accuracy(q)))
    compiled[name] = path
""")
md("## 4. Accuracy")
code("""
print(f"{'model':18} {'bits/weight':>11} {'test acc':>9} {'PyTorch QAT':>11}")
for name, bits, acc, torch_acc in rows:
    print(f"{name:18} {bits:11.2f} {acc:9.2%} " + (f"{torch_acc:11.2%}" if torch_acc is not None else f"{'':>11}"))
for name, bits, acc, torch_acc in rows[1:]:
    assert bits <= 4.0                        # >= 8x smaller than fp32
    assert acc >= acc_fp32 - 0.015            # within 1.5 points of fp32 on this split
    assert abs(acc - torch_acc) <= 2 / 540    # the compiled module predicts as the trained one
""")
md("""
## 5. The precision of every channel

`soniq_tvm.plot.precision_map` reads the annotations of the exported file: a row per
layer, a cell per input channel, coloured by its width.
""")
code("""
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from soniq_tvm.plot import precision_grid, precision_map

fig, axes = plt.subplots(1, 2, figsize=(12, 2.8))
for ax, (name, path) in zip(axes, compiled.items()):
    precision_map(path, ax=ax, title=f"{name}: weight widths per input channel")
fig.tight_layout()
plt.show()
names, grid = precision_grid(compiled["{2,8}"])
low = np.nansum(grid == 2) / np.sum(~np.isnan(grid))
print(f"{{2,8}}: {low:.0%} of the weight channels at 2 bits")
assert 0 < low < 1
""")
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
nbf.write(nb, str(__import__("pathlib").Path(__file__).with_name("02_qat_to_deployment.ipynb")))

# ---- 04: against the peers -------------------------------------------------------------------
cells = []
md("""
# soniq-tvm against its peers

**You will learn** how the compiled SONIQ models compare with PyTorch, ONNX Runtime fp32
and ONNX Runtime INT8 in latency and model size, measured by the project's own
benchmark harness (`benchmarks/`, the code behind `benchmarks/RESULTS.md`): every peer
runs in one process, interleaved rounds pair each soniq row with ORT INT8, and every
row's outputs are compared with its reference.

The models are the benchmark's **tiny** ResNet-18 and BERT (the full ones take minutes);
the shapes of the figures, not their values, carry over: see `benchmarks/RESULTS.md` for
full-size runs. Timings on a shared 2-core machine are noisy.
""")
code("""
import pathlib, sys, tempfile
import numpy as np
import soniq_tvm

repo = pathlib.Path(soniq_tvm.__file__).resolve().parents[1]  # benchmarks/ lives beside the package
sys.path.insert(0, str(repo))
from benchmarks.run import run

work = pathlib.Path(tempfile.mkdtemp())
results = run(["--quick", "--models", "resnet18,bert", "--peers", "torch,ort_fp32,ort_int8,soniq",
               "--variants", "steps/tensor,{1,4},uniform", "--repeats", "15", "--pair-rounds", "5",
               "--workdir", str(work), "--no-cache", "--out", str(work / "results.json")],
              log=lambda line: None)
print(results["table"])
rows = [r for r in results["rows"] if r["timing"]]
assert {r["model"] for r in rows} == {"resnet18 (tiny)", "bert (tiny)"}
""")
md("""
## Latency

Median milliseconds per batch-1 inference, 2 threads. The soniq rows are exact against
ONNX Runtime running their own file (the agreement column above).
""")
code("""
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
for ax, model in zip(axes, ["resnet18 (tiny)", "bert (tiny)"]):
    mine = [r for r in rows if r["model"] == model]
    ax.barh([r["variant"] for r in mine], [r["timing"]["median_ms"] for r in mine],
            color=["tab:orange" if r["variant"].startswith("soniq") else "tab:gray" for r in mine])
    ax.set_title(model); ax.set_xlabel("median ms"); ax.invert_yaxis()
fig.tight_layout()
plt.show()
for r in rows:
    if r["variant"].startswith("soniq"):
        assert r["agreement"]["match_fraction"] >= 0.99 or "{1,4}" in r["variant"], r  # {1,4}: fp32 drift in ORT
        print(f"{r['model']:16} {r['variant']:36} x ORT INT8 paired {r['paired_ort_int8']:.2f}")
""")
md("""
## Model size

Weight bytes as each peer stores them: fp32 (the exported file), ONNX Runtime's INT8 QDQ
file (one byte per weight), and the soniq files' weights packed at their real widths
(`inspect(..., family="bitplane-ref")`: bit-planes, what the narrow kernels keep; the
int8-dot kernels the compiler picks for speed on this CPU keep a byte per weight).
""")
code("""
import os

sizes = {}
for model in ("resnet18", "bert"):
    sizes[(model, "fp32 ONNX")] = os.path.getsize(work / f"{model}_tiny.onnx")
    sizes[(model, "ORT INT8 QDQ")] = os.path.getsize(work / f"{model}_tiny_ort_int8.onnx")
    for f in sorted(work.glob(f"{model}_tiny*soniq*.onnx")):
        plan = soniq_tvm.inspect(str(f), family="bitplane-ref")
        sizes[(model, f.stem.split("soniq_")[-1] + " packed")] = plan.bytes_after
fig, axes = plt.subplots(1, 2, figsize=(12, 3))
for ax, model in zip(axes, ("resnet18", "bert")):
    items = [(k[1], v / 1024) for k, v in sizes.items() if k[0] == model]
    ax.barh([k for k, _ in items], [v for _, v in items]); ax.set_title(f"{model} (tiny)")
    ax.set_xlabel("KiB"); ax.invert_yaxis()
fig.tight_layout()
plt.show()
for (model, what), b in sizes.items():
    print(f"{model:9} {what:28} {b / 1024:9.1f} KiB")
packed = [b for (m, w), b in sizes.items() if "packed" in w and "uniform" not in w and "2-8_0" not in w]
assert packed and all(b < sizes[("resnet18", "fp32 ONNX")] for b in packed)
""")
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
nbf.write(nb, str(__import__("pathlib").Path(__file__).with_name("04_peers.ipynb")))
