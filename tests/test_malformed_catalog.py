"""A catalog of malformed inputs: files, annotations, targets, arguments, tuning
databases and saved modules. Each one must raise a typed ``SoniqError`` subclass
whose message names the culprit (the file, node, tensor, channel or argument) -
never a traceback from inside onnx, TVM or SQLite.

The focused tests of each error live beside the code they test; this file is the
count: every entry is a distinct way to get an input wrong, and the catalog must
keep at least 40 of them, spread over every kind of input.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import soniq_tvm
from soniq_tvm import (AnnotationError, ArtifactError, HardwareMismatchError, InputError, ModelLoadError,
                       ResourceLimitError, SoniqError, TargetError, TuningDatabaseError, UnsupportedModelError)

from .helpers import conv_case

W_DQ, A_DQ = "conv1.w_dq", "act1.dq"


@dataclass
class Env:
    """What a catalog entry may build on: a fresh model, a scratch folder, one saved
    module (shared, copy before changing it) and one valid tuning database."""
    tmp: object
    saved: object

    def model(self) -> onnx.ModelProto:
        return conv_case(np.random.default_rng(0), 4, 5, [2, 8, 2, 8], [2, 8, 2, 8], w_axis=1).model

    def x(self) -> np.ndarray:
        return np.zeros((1, 4, 6, 7), np.float32)

    def save(self, model, name="m.onnx") -> str:
        path = self.tmp / name
        onnx.save(model, str(path))
        return str(path)

    def artifact(self) -> str:
        dst = self.tmp / "copy.soniq"
        shutil.copytree(self.saved[1], dst)
        return dst

    def database(self) -> str:
        from soniq_tvm.tuning import TuningDatabase

        path = self.tmp / "t.db"
        TuningDatabase(path).close()
        return str(path)


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _set_prop(props, key, value):
    """Set (or with value None, drop) one key of a metadata_props list."""
    keep = [(p.key, p.value) for p in props if p.key != key]
    if value is not None:
        keep.append((key, value))
    del props[:]
    for k, v in keep:
        props.add(key=k, value=v)


def _meta(model, node, key, value):
    """Set (or with value None, drop) one annotation key of a node; the model-level
    map is dropped so the node's own annotation is what the reader sees."""
    _set_prop(_node(model, node).metadata_props, key, value)
    return _model_meta(model, "soniq.quant_map", None)


def _annotated(node, key, value):
    """Compiling the catalog's model with one annotation key of ``node`` changed."""
    return lambda e: _compile(_meta(e.model(), node, key, value))


def _model_meta(model, key, value):
    _set_prop(model.metadata_props, key, value)
    return model


def _only_map(model, entries):
    """The activation annotated only through the model-level map, with these entries."""
    del _node(model, A_DQ).metadata_props[:]
    return _model_meta(model, "soniq.quant_map", json.dumps(entries))


def _init(model, name, fn):
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(onnx.numpy_helper.from_array(fn(onnx.numpy_helper.to_array(init).copy()), name))
    return model


def _set(arr, index, value):
    arr[index] = value
    return arr


def _graph(nodes, inputs, outputs, inits=(), opset=21):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _float8_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])
    z = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0])
    return _graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q8"),
                   helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq8")], [x], [y], [s, z])


def _rewrite_manifest(path, change):
    """Change a saved module's manifest and re-sign it, so only the change is wrong."""
    from soniq_tvm.artifact import _signature

    man = json.loads((path / "manifest.json").read_text())
    change(man)
    man["sha256"] = _signature(path, man)
    (path / "manifest.json").write_text(json.dumps(man))
    return path


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path, keep):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep(len(data))])
    return path


def _db_meta(path, key, value):
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE meta SET value=? WHERE key=?", (value, key))
    con.close()
    return path


def _open_db(path):
    from soniq_tvm.tuning import TuningDatabase

    TuningDatabase(path, create=False).close()


def _cli(*argv):
    """The CLI's own handling: prints the error and returns 2; re-raised here so the
    catalog checks the type and the message the user sees."""
    from soniq_tvm.cli import build_parser

    args = build_parser().parse_args([str(a) for a in argv])
    args.fn(args)


def _compile(model, *args, **kwargs):
    return soniq_tvm.compile(model, *args, **kwargs)


def _run_saved(env, *args, **kwargs):
    return soniq_tvm.load(env.saved[1]).run(*args, **kwargs)


def _env_memory(model, value):
    old = os.environ.get("SONIQ_MEMORY_LIMIT")
    os.environ["SONIQ_MEMORY_LIMIT"] = value
    try:
        soniq_tvm.compile(model)
    finally:
        if old is None:
            del os.environ["SONIQ_MEMORY_LIMIT"]
        else:
            os.environ["SONIQ_MEMORY_LIMIT"] = old


# (id, kind of input, expected error, culprit the message must name, what triggers it)
Entry = tuple[str, str, type, str, Callable[[Env], object]]
CATALOG: list[Entry] = [
    # -- files --------------------------------------------------------------------------
    ("missing-file", "file", ModelLoadError, "nope.onnx", lambda e: _compile(e.tmp / "nope.onnx")),
    ("directory-not-file", "file", ModelLoadError, "a_dir", lambda e: (os.makedirs(e.tmp / "a_dir"),
                                                                      _compile(e.tmp / "a_dir"))),
    ("garbage-bytes", "file", ModelLoadError, "junk.onnx",
     lambda e: ((e.tmp / "junk.onnx").write_bytes(b"\x00\x01 not protobuf \xff" * 20), _compile(e.tmp / "junk.onnx"))),
    ("empty-file", "file", ModelLoadError, "empty.onnx",
     lambda e: ((e.tmp / "empty.onnx").write_bytes(b""), _compile(e.tmp / "empty.onnx"))),
    ("truncated-file", "file", ModelLoadError, "m.onnx",
     lambda e: _compile(_truncate(e.save(e.model()), lambda n: n // 2))),
    ("checker-fails", "file", ModelLoadError, "m.onnx",
     lambda e: _compile(e.save(_graph([helper.make_node("Relu", ["nowhere"], ["y"], name="r")],
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])))),
    ("unsupported-operator", "file", UnsupportedModelError, "my_det",
     lambda e: _compile(_graph([helper.make_node("Det", ["x"], ["y"], name="my_det")],
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])]))),
    ("dynamic-dimension", "file", UnsupportedModelError, "'x'",
     lambda e: _compile(_dynamic(e.model()))),
    ("float8-quantization", "file", UnsupportedModelError, "float8", lambda e: _compile(_float8_model())),
    # -- annotations --------------------------------------------------------------------
    ("bits-not-json", "annotation", AnnotationError, W_DQ, _annotated(W_DQ, "soniq.bits", "[2, 8,")),
    ("bits-empty", "annotation", AnnotationError, W_DQ, _annotated(W_DQ, "soniq.bits", "[]")),
    ("bits-not-integers", "annotation", AnnotationError, W_DQ, _annotated(W_DQ, "soniq.bits", "[2.5, 8, 2, 8]")),
    ("bits-count-wrong", "annotation", AnnotationError, W_DQ, _annotated(W_DQ, "soniq.bits", "[2, 8, 2]")),
    ("bits-zero", "annotation", AnnotationError, "channel 0", _annotated(W_DQ, "soniq.bits", "[0, 8, 2, 8]")),
    ("bits-nine", "annotation", AnnotationError, "channel 2", _annotated(A_DQ, "soniq.bits", "[2, 8, 9, 8]")),
    ("signed-not-flag", "annotation", AnnotationError, W_DQ, _annotated(W_DQ, "soniq.signed", "yes")),
    ("axis-not-integer", "annotation", AnnotationError, W_DQ, _annotated(W_DQ, "soniq.axis", "one")),
    ("axis-out-of-range", "annotation", AnnotationError, W_DQ, _annotated(W_DQ, "soniq.axis", "7")),
    ("bits-without-axis", "annotation", AnnotationError, A_DQ, _annotated(A_DQ, "soniq.axis", None)),
    ("weight-outside-width", "annotation", AnnotationError, "channel 0",
     lambda e: _compile(_init(e.model(), "conv1.w", lambda w: _set(w, (0, 0, 0, 0), 7)))),
    ("activation-contradicts-clamp", "annotation", AnnotationError, "channel 0",
     _annotated(A_DQ, "soniq.bits", "[8, 8, 2, 8]")),
    ("format-from-the-future", "annotation", AnnotationError, "soniq-qdq/9",
     lambda e: _compile(_model_meta(e.model(), "soniq.format", "soniq-qdq/9"))),
    ("quant-map-not-json", "annotation", AnnotationError, "soniq.quant_map",
     lambda e: _compile(_model_meta(e.model(), "soniq.quant_map", "{oops"))),
    ("quant-map-not-objects", "annotation", AnnotationError, "soniq.quant_map",
     lambda e: _compile(_model_meta(e.model(), "soniq.quant_map", '{"act1": [2, 8]}'))),
    ("quant-map-missing-field", "annotation", AnnotationError, "'bits'",
     lambda e: _compile(_only_map(e.model(), {"act1": {"axis": 1, "signed": False}}))),
    ("quant-map-bad-bits", "annotation", AnnotationError, "act1",
     lambda e: _compile(_only_map(e.model(), {"act1": {"axis": 1, "bits": "two", "signed": False}}))),
    ("activation-step-not-positive", "annotation", AnnotationError, "act1.scale",
     lambda e: _compile(_init(e.model(), "act1.scale", lambda s: s * 0 - 1.0))),
    ("activation-step-nan", "annotation", AnnotationError, "act1.scale",
     lambda e: _compile(_init(e.model(), "act1.scale", lambda s: s * np.nan))),
    # -- targets ------------------------------------------------------------------------
    ("target-empty", "argument", TargetError, "empty target", lambda e: _compile(e.model(), "")),
    ("target-unknown-kind", "argument", TargetError, "'tpu'", lambda e: _compile(e.model(), "tpu -mcpu=x")),
    ("target-unknown-option", "argument", TargetError, "mcpux", lambda e: _compile(e.model(), "llvm -mcpux=znver3")),
    ("target-option-without-dash", "argument", TargetError, "mcpu=znver3",
     lambda e: _compile(e.model(), "llvm mcpu=znver3")),
    ("target-integer-option", "argument", TargetError, "'num-cores'",
     lambda e: _compile(e.model(), "llvm -num-cores=many")),
    ("target-bad-json", "argument", TargetError, "JSON", lambda e: _compile(e.model(), '{"kind": "llvm",')),
    ("target-wrong-type", "argument", TargetError, "int", lambda e: _compile(e.model(), 42)),
    ("target-cuda-without-arch", "argument", TargetError, "arch", lambda e: _compile(e.model(), "cuda")),
    # -- other arguments ----------------------------------------------------------------
    ("split-mode-unknown", "argument", InputError, "sometimes", lambda e: _compile(e.model(), split="sometimes")),
    ("memory-bound-too-small", "argument", ResourceLimitError, "bound",
     lambda e: _compile(e.model(), memory_limit=1024)),
    ("memory-bound-env-garbage", "argument", ResourceLimitError, "SONIQ_MEMORY_LIMIT",
     lambda e: _env_memory(e.model(), "lots")),
    ("cli-shape-without-dims", "argument", InputError, "'x'", lambda e: _cli("inspect", "m.onnx", "--shape", "x")),
    ("cli-shape-not-integer", "argument", InputError, "x=1,a",
     lambda e: _cli("inspect", "m.onnx", "--shape", "x=1,a")),
    ("cli-rpc-without-key", "argument", InputError, "--rpc-key",
     lambda e: _cli("tune", e.save(e.model()), "--db", e.tmp / "t.db", "--rpc", "localhost:9190")),
    ("cli-merge-into-input", "argument", InputError, "a.db",
     lambda e: _cli("db", "merge", e.tmp / "a.db", "-o", e.tmp / "a.db")),
    ("cli-input-file-unreadable", "argument", InputError, "missing.npy",
     lambda e: _cli("run", e.saved[1], "--input", e.tmp / "missing.npy")),
    ("tune-negative-trials", "argument", SoniqError, "-1",
     lambda e: soniq_tvm.tune(e.model(), "llvm", e.tmp / "t.db", trials=-1, progress=False)),
    ("tune-unknown-cost-model", "argument", SoniqError, "'magic'",
     lambda e: soniq_tvm.tune(e.model(), "llvm", e.tmp / "t.db", cost_model="magic", progress=False)),
    ("run-missing-input", "argument", InputError, "'x'", lambda e: _run_saved(e, {})),
    ("run-unknown-input", "argument", InputError, "'y'", lambda e: _run_saved(e, {"x": e.x(), "y": e.x()})),
    ("run-wrong-shape", "argument", InputError, "'x'", lambda e: _run_saved(e, {"x": np.zeros((1, 4, 6, 6), "f4")})),
    ("run-wrong-dtype", "argument", InputError, "float64", lambda e: _run_saved(e, {"x": e.x().astype("f8")})),
    ("run-too-many-positional", "argument", InputError, "2 positional", lambda e: _run_saved(e, e.x(), e.x())),
    ("benchmark-zero-repeats", "argument", InputError, "repeat",
     lambda e: soniq_tvm.load(e.saved[1]).benchmark({"x": e.x()}, repeat=0)),
    ("probe-without-probes", "argument", ArtifactError, "probes", lambda e: e.saved[2].probe({"x": e.x()})),
    # -- tuning databases ---------------------------------------------------------------
    ("db-not-sqlite", "database", TuningDatabaseError, "notes.db",
     lambda e: ((e.tmp / "notes.db").write_text("records, one per line\n" * 10), _open_db(e.tmp / "notes.db"))),
    ("db-empty-file", "database", TuningDatabaseError, "empty.db",
     lambda e: ((e.tmp / "empty.db").write_bytes(b""), _open_db(e.tmp / "empty.db"))),
    ("db-missing", "database", TuningDatabaseError, "absent.db", lambda e: _open_db(e.tmp / "absent.db")),
    ("db-is-directory", "database", TuningDatabaseError, "work_dir",
     lambda e: (os.makedirs(e.tmp / "work_dir"), _open_db(e.tmp / "work_dir"))),
    ("db-parent-missing", "database", TuningDatabaseError, "t.db",
     lambda e: soniq_tvm.tuning.TuningDatabase(e.tmp / "no" / "such" / "t.db")),
    ("db-truncated", "database", TuningDatabaseError, "t.db",
     lambda e: _open_db(_truncate(_grown_database(e), lambda n: n - 1000))),
    ("db-header-only", "database", TuningDatabaseError, "t.db",
     lambda e: _open_db(_truncate(e.database(), lambda n: 50))),
    ("db-foreign-sqlite", "database", TuningDatabaseError, "other.db",
     lambda e: (_sqlite_table(e.tmp / "other.db"), _open_db(e.tmp / "other.db"))),
    ("db-foreign-format", "database", TuningDatabaseError, "t.db",
     lambda e: _open_db(_db_meta(e.database(), "format", "metaschedule-json"))),
    ("db-newer-version", "database", TuningDatabaseError, "t.db",
     lambda e: _open_db(_db_meta(e.database(), "version", "99"))),
    # -- saved modules ------------------------------------------------------------------
    ("artifact-missing", "artifact", ArtifactError, "gone.soniq", lambda e: soniq_tvm.load(e.tmp / "gone.soniq")),
    ("artifact-flipped-byte", "artifact", ArtifactError, "copy.soniq",
     lambda e: soniq_tvm.load(_then(e.artifact(), lambda p: _flip_byte(p / "module.so")))),
    ("artifact-swapped-library", "artifact", ArtifactError, "copy.soniq",
     lambda e: soniq_tvm.load(_then(e.artifact(), lambda p: (p / "module.so").write_bytes(_other_library(e))))),
    ("artifact-edited-manifest", "artifact", ArtifactError, "copy.soniq",
     lambda e: soniq_tvm.load(_then(e.artifact(), lambda p: _edit_json(p / "manifest.json", "inputs", [])))),
    ("artifact-truncated-manifest", "artifact", ArtifactError, "manifest.json",
     lambda e: soniq_tvm.load(_then(e.artifact(), lambda p: _truncate(p / "manifest.json", lambda n: n // 2)))),
    ("artifact-missing-library", "artifact", ArtifactError, "module.so",
     lambda e: soniq_tvm.load(_then(e.artifact(), lambda p: (p / "module.so").unlink()))),
    ("artifact-missing-weights", "artifact", ArtifactError, "weights.bin",
     lambda e: soniq_tvm.load(_then(e.artifact(), lambda p: (p / "weights.bin").unlink()))),
    ("artifact-flipped-weight-byte", "artifact", ArtifactError, "copy.soniq",
     lambda e: soniq_tvm.load(_then(e.artifact(), lambda p: _flip_byte(p / "weights.bin")))),
    ("artifact-weights-other-family", "artifact", ArtifactError, "weights.bin",
     lambda e: soniq_tvm.load(_rewrite_manifest(e.artifact(), lambda m: [
         x.update(family="no-such-family") for x in m["weights"]["entries"] if x["kind"] == "codes"]))),
    ("artifact-foreign-format", "artifact", ArtifactError, "manifest.json",
     lambda e: soniq_tvm.load(_then(e.artifact(), lambda p: _edit_json(p / "manifest.json", "format", "x/1")))),
    ("artifact-other-tvm", "artifact", ArtifactError, "0.1.0",
     lambda e: soniq_tvm.load(_rewrite_manifest(e.artifact(), lambda m: m["versions"].update(tvm="0.1.0")))),
    ("artifact-other-cpu-features", "artifact", HardwareMismatchError, "imaginary_isa",
     lambda e: soniq_tvm.load(_rewrite_manifest(e.artifact(), lambda m: m.update(
         required_features=list(m.get("required_features", [])) + ["imaginary_isa"])))),
]


def _then(value, fn):
    fn(value)
    return value


def _edit_json(path, key, value):
    d = json.loads(path.read_text())
    d[key] = value
    path.write_text(json.dumps(d))


def _dynamic(model):
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def _sqlite_table(path):
    con = sqlite3.connect(path)
    with con:
        con.execute("CREATE TABLE notes (text TEXT)")
        con.executemany("INSERT INTO notes VALUES (?)", [("x" * 200,)] * 200)
    con.close()


def _grown_database(env):
    """A database several pages long (SQLite files grow by whole pages)."""
    path = env.database()
    con = sqlite3.connect(path)
    with con:
        con.execute("CREATE TABLE padding (text TEXT)")
        con.executemany("INSERT INTO padding VALUES (?)", [("x" * 500,)] * 100)
    con.close()
    return path


def _other_library(env):
    """The library of a different saved module (another model's kernels)."""
    case = conv_case(np.random.default_rng(3), 4, 3, [8] * 4, [8] * 4)
    return soniq_tvm.compile(case.model).save(env.tmp / "other.soniq").joinpath("module.so").read_bytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    case = conv_case(np.random.default_rng(1), 4, 5, [2, 8, 2, 8], [2, 8, 2, 8])
    folder = tmp_path_factory.mktemp("catalog")
    m = soniq_tvm.compile(case.model)
    bare = soniq_tvm.compile(case.model, probes=False)
    return m, m.save(folder / "m.soniq"), bare


@pytest.mark.parametrize("name, kind, error, culprit, trigger", CATALOG, ids=[c[0] for c in CATALOG])
def test_malformed_input_gets_a_typed_error_naming_the_culprit(name, kind, error, culprit, trigger, saved,
                                                               tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SoniqError) as e:
        trigger(Env(tmp_path, saved))
    assert type(e.value) is error, f"{name}: {type(e.value).__name__} instead of {error.__name__}: {e.value}"
    assert culprit in str(e.value), f"{name}: the message does not name {culprit!r}: {e.value}"


def test_the_catalog_covers_forty_distinct_inputs_of_every_kind():
    names = [c[0] for c in CATALOG]
    assert len(set(names)) == len(names) >= 40
    kinds = {c[1] for c in CATALOG}
    assert kinds == {"file", "annotation", "argument", "database", "artifact"}
    for kind in kinds:
        assert sum(c[1] == kind for c in CATALOG) >= 5, kind
