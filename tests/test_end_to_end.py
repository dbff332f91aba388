"""Both bundled example models, compiled and checked against ONNX Runtime; the
saved module loaded and run in a fresh process; cross-built artifacts refused."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import soniq_tvm
from soniq_tvm import HardwareMismatchError, hardware, models
from soniq_tvm.targets import parse_target, required_features
from soniq_tvm.verify import verify


@pytest.fixture(scope="module", params=[("cnn", "always"), ("transformer", "always"), ("cnn", "auto"),
                                        ("transformer", "auto")], ids=lambda p: "-".join(p))
def example(request):
    name, split = request.param
    proto = models.example_cnn() if name == "cnn" else models.example_transformer()
    return f"{name}-{split}", proto, soniq_tvm.compile(proto, "llvm", split=split)


def test_matches_onnx_runtime(example):
    name, proto, m = example
    for seed in range(3):
        report = verify(proto, m, inputs=models.example_inputs(proto, seed=seed))
        assert report.ok, f"{name} seed {seed}:\n{report}"


def test_plan_is_mixed_and_packed(example):
    name, _, m = example
    plan = m.plan
    assert plan.layers, "no integer layer was folded"
    mixed = [l for l in plan.layers if len(set(l.w_bits)) > 1 or len(set(l.a_bits)) > 1]
    split = [l for l in mixed if len(l.groups) >= 2]
    if name.endswith("always"):
        assert split == mixed and split, "every mixed layer must be split into channel groups"
    elif len(split) < len(mixed):  # auto: the layers kept whole are counted in the notes
        assert any(f"{len(mixed) - len(split)} mixed-precision layer(s) run whole" in n for n in plan.notes)
    assert all(g.bytes_packed > 0 for l in plan.layers for g in l.groups)  # real stored bytes per family
    assert not plan.float_layers
    for layer in (l for l in plan.layers if l.kind != "act-matmul"):  # attention's matmuls: no weights
        assert sum(g.in_channels for g in layer.groups if g.index == layer.groups[0].index) > 0
        assert all(1 <= g.w_bits <= 8 and 1 <= g.a_bits <= 8 for g in layer.groups)
    back = soniq_tvm.Plan.from_dict(json.loads(plan.to_json()))
    assert back == plan
    assert "packed" in str(plan)


def test_bitplane_packing_compresses(example):
    name, proto, _ = example
    plan = soniq_tvm.inspect(proto, family="bitplane-ref")
    assert plan.bytes_after < 0.75 * plan.bytes_before, plan  # half the channels are 2-bit
    assert plan.compression > 5


def test_save_load_run_in_fresh_process(example, tmp_path):
    name, proto, m = example
    inputs = models.example_inputs(proto, seed=5)
    expect = m.run(inputs)
    path = m.save(tmp_path / f"{name}.soniq")
    np.savez(tmp_path / "in.npz", **inputs)
    code = f"""
import sys, numpy as np, soniq_tvm
m = soniq_tvm.load({str(path)!r})
ins = dict(np.load({str(tmp_path / 'in.npz')!r}))
np.save({str(tmp_path / 'out.npy')!r}, m.run(ins)[0])
print(sorted(k for k in ("onnx", "soniq_tvm.passes", "soniq_tvm.compiler", "onnxruntime") if k in sys.modules))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", "loading imported compiler-side modules"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expect[0])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["plan"]["layers"] and manifest["inputs"][0]["name"] in inputs
    assert set(manifest["versions"]) >= {"tvm", "tvm_ffi", "soniq_tvm"} and len(manifest["sha256"]) == 64


def test_save_is_atomic_and_replaces(example, tmp_path):
    _, _, m = example
    p = m.save(tmp_path / "a.soniq")
    m.save(p)  # overwrite in place
    leftovers = [q.name for q in tmp_path.iterdir() if q.name != "a.soniq"]
    assert leftovers == []
    assert sorted(q.name for q in p.iterdir()) == ["manifest.json", "module.so", "weights.bin"]
    assert json.loads((p / "manifest.json").read_text())["library"] == "module.so"


def _unsupported_x86_target():
    for cpu in ("skylake-avx512", "icelake-server", "sapphirerapids", "graniterapids", "diamondrapids"):
        d = parse_target(f"llvm -mcpu={cpu}")
        if hardware.missing_features(required_features(d)):
            return d
    return None


def test_cross_built_x86_artifact_is_refused(tmp_path):
    target = _unsupported_x86_target()
    if target is None:
        pytest.skip("this CPU supports every x86 feature set we can cross-build for")
    proto = models.example_cnn()
    m = soniq_tvm.compile(proto, target)
    path = m.save(tmp_path / "x86.soniq")
    missing = hardware.missing_features(required_features(target))
    with pytest.raises(HardwareMismatchError, match=missing[0]):
        soniq_tvm.load(path)
    with pytest.raises(HardwareMismatchError):
        m.run(models.example_inputs(proto))


def test_cross_built_aarch64_artifact_saved_and_refused(tmp_path):
    if hardware.host_arch() == "aarch64":
        pytest.skip("host is aarch64")
    proto = models.example_transformer()
    m = soniq_tvm.compile(proto, "llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
    path = m.save(tmp_path / "arm.soniq")
    import tarfile

    with tarfile.open(path / "module.tar") as tar:
        objects = [t for t in tar.getmembers() if t.name.endswith(".o")]
        assert objects
        head = tar.extractfile(objects[0]).read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(HardwareMismatchError, match="aarch64"):
        soniq_tvm.load(path)


@pytest.fixture(scope="module")
def cuda_module():
    proto = models.example_cnn()
    return proto, soniq_tvm.compile(proto, "cuda -arch=sm_80")


def test_cuda_build_without_gpu(cuda_module, tmp_path):
    """CUDA code is generated and compiled here (nvcc), kernels included."""
    _, m = cuda_module

    def walk(mod):
        yield mod
        for sub in mod.imports:
            yield from walk(sub)

    kinds = [x.kind for x in walk(m._exec.mod)]
    assert "cuda" in kinds
    src = next(x for x in walk(m._exec.mod) if x.kind == "cuda").inspect_source()
    assert "soniq_conv2d" in src and "__global__" in src
    path = m.save(tmp_path / "gpu.soniq")
    import tvm

    if not tvm.cuda(0).exist:
        with pytest.raises(HardwareMismatchError, match="CUDA"):
            soniq_tvm.load(path)


@pytest.mark.gpu
def test_cuda_module_matches_onnx_runtime(cuda_module):
    proto, m = cuda_module
    report = verify(proto, m, inputs=models.example_inputs(proto))
    assert report.ok, str(report)


def test_profile_names_every_kernel(example):
    from soniq_tvm.passes._common import safe_name

    name, proto, m = example
    inputs = models.example_inputs(proto, seed=1)
    rows = m.profile(inputs, repeat=3)
    kernels = [r for r in rows if r["name"].startswith("soniq_") and not r["name"].startswith("soniq_act_matmul")]
    # a layer whose activation scale groups run in one kernel (soniq_<kind>_<layer>_groups) is one row
    fused = {r["name"] for r in kernels if r["name"].endswith("_groups")}
    n_groups = sum(1 if f"soniq_{layer.kind}_{safe_name(layer.name)}_groups" in fused else len(layer.groups)
                   for layer in m.plan.layers)
    assert len(kernels) == n_groups, (name, [r["name"] for r in kernels])
    # attention's activation x activation kernels: as many calls as the plan's note counts
    noted = [int(re.match(r"(\d+) activation x activation", n).group(1)) for n in m.plan.notes
             if re.match(r"\d+ activation x activation", n)]
    act_calls = sum(r["calls"] for r in rows if r["name"].startswith("soniq_act_matmul"))
    assert act_calls == sum(noted)
    assert all(r["calls"] >= 1 and r["us"] > 0 for r in rows)
    assert abs(sum(r["share"] for r in rows) - 1.0) < 1e-6
    assert [r["us"] for r in rows] == sorted((r["us"] for r in rows), reverse=True)
    with pytest.raises(soniq_tvm.SoniqError):
        m.profile(inputs, repeat=0)


def test_runs_on_every_physical_core_by_default():
    code = """
import os, numpy as np, soniq_tvm
from soniq_tvm import hardware, models
os.environ.pop("TVM_NUM_THREADS", None)
proto = models.example_cnn()
m = soniq_tvm.compile(proto)
m.run(models.example_inputs(proto))
import tvm_ffi
print(os.environ["TVM_NUM_THREADS"], tvm_ffi.get_global_func("runtime.NumThreads")(), hardware.physical_cores())
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    told, pool, cores = (int(v) for v in out.stdout.split()[-3:])
    assert told == pool == cores >= 1


def test_run_refills_inputs_and_owns_outputs(example, monkeypatch):
    """Inputs go through numpy views of the module's device buffers, refilled each
    call; outputs are copies (a later call or the caller's edits do not alias them);
    positional, dict and keyword inputs agree; without DLPack views the copy path
    gives the same numbers."""
    from soniq_tvm import artifact

    name, proto, m = example
    a, b = (models.example_inputs(proto, seed=s) for s in (3, 4))
    (key,) = a
    out_a = m.run(a)[0]
    out_b = m.run(b[key])[0]
    assert not np.array_equal(out_a, out_b)
    np.testing.assert_array_equal(m.run(**{key: a[key]})[0], out_a)
    out_a[...] = 0  # the caller owns its result
    np.testing.assert_array_equal(m.run(np.asfortranarray(b[key]))[0], out_b)
    monkeypatch.setattr(artifact, "_numpy_views", lambda bufs: None)
    fresh = artifact.CompiledModule(m._lib, m.manifest, m._exec, weights=m._weights)
    np.testing.assert_array_equal(fresh.run(b)[0], out_b)
    assert fresh._inviews is None
