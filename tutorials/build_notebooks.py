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
a ReLU, and a second conv reading 4-bit / 8-bit unsigned activations.
""")
code("""
rng = np.random.default_rng(0)
b = QDQBuilder("tutorial_cnn")
x = b.input("x", [1, 12, 16, 16])

bits1 = choose_bits(12, palette=(2, 8), low_fraction=0.75, rng=1)
xq = b.quant_act(x, scale=0.25, bits=bits1, signed=True)
w1, s1 = quantize_weights(rng.standard_normal((16, 12, 3, 3)), bits1, axis=1)
y = b.node("Relu", [b.conv(xq, w1, s1, bits1, w_axis=1, pads=(1, 1, 1, 1))])

bits2 = choose_bits(16, palette=(4, 8), low_fraction=0.5, rng=2)
yq = b.quant_act(y, scale=0.5, bits=bits2, signed=False)
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
