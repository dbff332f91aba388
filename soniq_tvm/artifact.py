"""Compiled modules: run, benchmark, save to disk and load in a fresh process.

A saved module is a directory ``NAME.soniq/`` holding

* ``module.so``: the compiled library (Relax VM executable and kernels); for a
  foreign architecture (cross-compiled, e.g. aarch64 on x86) ``module.tar``
  holding the object files instead, linked on the target machine at load time;
* ``weights.bin``: the integer kernels' weights at their real widths (a 2-bit
  channel in 2 bits), rebuilt into the kernels' layouts in memory when the
  module loads (:mod:`soniq_tvm.weights`; timed: ``weights_load_seconds``);
* ``manifest.json``: format, input/output names, shapes and dtypes, the target,
  the ISA features the code needs, the precision plan, how each weight is
  stored, library versions and a SHA-256 over the library, the weights and the
  manifest.

Loading needs only the TVM runtime: this module imports neither onnx nor the
compiler passes. It checks the hash (corruption, tampering), the versions, and
that this CPU has every instruction-set feature the code was built for (an
AVX-512 module on an AVX2 host is refused instead of dying with SIGILL).
Saving is atomic: the directory appears complete or not at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import __version__, hardware
from .errors import ArtifactError, HardwareMismatchError, InputError

__all__ = ["CompiledModule", "load", "FORMAT"]

FORMAT = "soniq-module/2"
_READABLE = ("soniq-module/1", FORMAT)  # /1: no weights.bin (every weight inside the library)
_LIB, _TAR, _MANIFEST, _WEIGHTS = "module.so", "module.tar", "manifest.json", "weights.bin"


def _versions() -> dict:
    import tvm
    import tvm_ffi

    return {"soniq_tvm": __version__, "tvm": tvm.__version__, "tvm_ffi": getattr(tvm_ffi, "__version__", "?")}


def _signature(path: Path, manifest: dict) -> str:
    """:func:`_digest` of the saved module in ``path`` as its files are now."""
    lib = (path / str(manifest.get("library", _LIB))).read_bytes()
    weights = (path / _WEIGHTS).read_bytes() if "weights" in manifest else b""
    return _digest(lib, manifest, weights)


def _digest(lib_bytes: bytes, manifest: dict, weights: bytes = b"") -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    h = hashlib.sha256(lib_bytes)
    h.update(weights)
    h.update(json.dumps(body, sort_keys=True).encode())
    return h.hexdigest()


class CompiledModule:
    """A compiled model: ``run(inputs)`` or ``m(x)``, ``save(path)``, ``plan``."""

    def __init__(self, library, manifest: dict, executable=None, weights=None):
        self._lib = library  # runtime Module or Executable
        self._exec = executable  # tvm.runtime.Executable (only right after compile)
        self.manifest = manifest
        self._weights = weights  # soniq_tvm.weights.WeightStore: main's parameters after the inputs
        self._wtensors = None
        self._vm = None
        self._inbufs = None  # device tensors of the inputs, refilled by every run
        self._main = None  # the VM's "main", looked up once

    # ---- description -------------------------------------------------------
    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    @property
    def target(self) -> dict:
        return self.manifest["target"]

    @property
    def weights_load_seconds(self) -> float:
        """Seconds :func:`load` took to rebuild the kernels' weight layouts (0 right after compile)."""
        return self._weights.load_seconds if self._weights is not None else 0.0

    @property
    def weight_bytes(self) -> dict:
        """``{"stored", "in_memory"}``: the lifted kernel weights at their real widths
        (``weights.bin``) and in the kernels' layouts."""
        w = self._weights
        return {"stored": w.stored_bytes if w else 0, "in_memory": w.memory_bytes if w else 0}

    @property
    def plan(self):
        from .plan import Plan

        return Plan.from_dict(self.manifest["plan"])

    def __repr__(self) -> str:
        ins = ", ".join(f"{i['name']}{tuple(i['shape'])}:{i['dtype']}" for i in self.inputs)
        return f"<CompiledModule inputs=[{ins}] target={self.target.get('kind')}>"

    # ---- running -------------------------------------------------------------
    def _device(self):
        import tvm

        return tvm.cuda(0) if self.target.get("kind") == "cuda" else tvm.cpu(0)

    def _machine(self):
        if self._vm is None:
            from tvm.runtime.vm import VirtualMachine

            _check_hardware(self.manifest, self.manifest.get("_source"))
            hardware.use_all_cores()
            self._vm = VirtualMachine(self._exec if self._exec is not None else self._lib, self._device())
        return self._vm

    def _given(self, args, kwargs) -> list:
        """The inputs in signature order, from ``({name: array},)``, positional arrays
        or keywords; names checked."""
        names = self._names
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            given = args[0]
        elif len(args) == len(names) and not kwargs:
            return list(args)
        else:
            if len(args) > len(names):
                raise InputError(f"got {len(args)} positional inputs, the model takes {len(names)}")
            given = dict(zip(names, args))
            given.update(kwargs)
        if len(given) != len(names) or any(k not in given for k in names):
            unknown = [k for k in given if k not in names]
            if unknown:
                raise InputError(f"unknown input {unknown[0]!r}", tensor=unknown[0], hint=f"inputs are {names}")
            missing = next(k for k in names if k not in given)
            raise InputError("missing input", tensor=missing, hint=f"inputs are {names}")
        return [given[k] for k in names]

    def _arguments(self, args, kwargs) -> list:
        """Device tensors for the inputs, checked against the compiled signature.
        The tensors are allocated once and refilled on every call (a module runs
        one call at a time, like the VM it wraps); on the CPU through numpy views
        of their memory (a plain ``np.copyto``, no per-call conversion)."""
        import tvm

        if self._inbufs is None:
            dev = self._device()
            self._names = [i["name"] for i in self.inputs]
            self._sig = [(tuple(i["shape"]), np.dtype(i["dtype"])) for i in self.inputs]
            self._inbufs = [tvm.runtime.empty(shape, str(dt), dev) for shape, dt in self._sig]
            self._inviews = _numpy_views(self._inbufs) if dev.dlpack_device_type() == 1 else None
        for i, arr in enumerate(self._given(args, kwargs)):
            if type(arr) is not np.ndarray:
                arr = np.asarray(arr)
            shape, dtype = self._sig[i]
            if arr.shape != shape:
                raise InputError(f"shape {list(arr.shape)} does not match the compiled {list(shape)}",
                                 tensor=self._names[i])
            if arr.dtype != dtype:
                raise InputError(f"dtype {arr.dtype} does not match the compiled {dtype}", tensor=self._names[i],
                                 hint=f"convert with .astype('{dtype}')")
            if self._inviews is not None:
                np.copyto(self._inviews[i], arr)
            else:
                self._inbufs[i].copyfrom(np.ascontiguousarray(arr))
        return self._inbufs + self._weight_tensors()

    def _weight_tensors(self) -> list:
        """The lifted weights as device tensors (made once, kept for the module's life)."""
        if self._wtensors is None:
            import tvm

            arrays = self._weights.arrays() if self._weights is not None else []
            self._wtensors = [tvm.runtime.tensor(a, self._device()) for a in arrays]
        return self._wtensors

    def run(self, *args, **kwargs) -> list[np.ndarray]:
        """Run on ``{name: array}`` (or positional arrays); returns a list of arrays."""
        if self._main is None:
            self._main = self._machine()["main"]
        return _to_numpy_list(self._main(*self._arguments(args, kwargs)))

    __call__ = run

    @property
    def has_probes(self) -> bool:
        """Whether the module was built with the ``soniq_probe`` entry point."""
        return "probes" in self.manifest

    def probe(self, *args, **kwargs) -> tuple[list[np.ndarray], list[tuple]]:
        """Run the ``soniq_probe`` entry point: ``(outputs, entries)``, one entry per
        integer kernel call, ``(qop dict, input codes, int32 result)``, and per
        attention matmul, ``({"kind": "act-matmul"}, a codes, b codes, int32
        result)``, in call order. Needs a module compiled with ``probes=True``
        (the default)."""
        if not self.has_probes:
            raise ArtifactError("this module was built without probes",
                                hint="compile it again with probes=True (the default) to check it layer by layer")
        result = self._machine()["soniq_probe"](*self._arguments(args, kwargs))
        outs = _to_numpy_list(result[0])
        pairs = _to_numpy_list(result[1])
        entries, at = [], 0
        for p in self.manifest["probes"]:
            n = 3 if p.get("kind") == "act-matmul" else 2
            entries.append((p, *pairs[at:at + n]))
            at += n
        return outs, entries

    def benchmark(self, inputs, number: int = 10, repeat: int = 5) -> dict:
        """Median latency (ms) of ``repeat`` measurements, each the mean of ``number`` runs."""
        for name, value in (("number", number), ("repeat", repeat)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        vm = self._machine()
        args = self._arguments((inputs,), {})
        res = vm.time_evaluator("main", self._device(), number=number, repeat=repeat)(*args)
        times = [t * 1e3 for t in res.results]
        return {"median_ms": float(np.median(times)), "min_ms": float(min(times)), "runs": len(times) * number}

    def profile(self, inputs, repeat: int = 10) -> list[dict]:
        """Per-call time of every function the model runs (kernels, glue, VM
        builtins), summed over a run and averaged over ``repeat`` runs after one
        warm-up; sorted slowest first. Each entry: ``name``, ``calls`` per run,
        ``us`` per run and ``share`` of the total. The timer wraps each call from
        Python, which adds about a microsecond per call."""
        import tvm
        from tvm.runtime.vm import VirtualMachine

        if repeat < 1:
            raise InputError(f"repeat must be at least 1, got {repeat}")
        self._machine()  # hardware check, thread count
        vm = VirtualMachine(self._exec if self._exec is not None else self._lib, self._device())
        args = self._arguments((inputs,), {})
        stats: dict[str, list] = {}
        started: dict[str, list] = {}
        sync = self._device().sync

        def instrument(_func, symbol, before, _ret, *_args):
            if before:
                started.setdefault(symbol, []).append(time.perf_counter())
            else:
                sync()
                entry = stats.setdefault(symbol, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - started[symbol].pop()
            return 0  # VMInstrumentReturnKind.NO_OP

        vm["main"](*args)
        vm.set_instrument(instrument)
        for _ in range(repeat):
            vm["main"](*args)
        total = sum(s[1] for s in stats.values()) or 1.0
        rows = [{"name": k, "calls": v[0] // repeat, "us": v[1] / repeat * 1e6, "share": v[1] / total}
                for k, v in stats.items()]
        return sorted(rows, key=lambda r: -r["us"])

    # ---- saving --------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (a directory) atomically; returns it."""
        path = Path(path)
        if self._exec is None and "_source" not in self.manifest:
            raise ArtifactError("this module has no library to save", file=str(path))
        parent = path.parent if str(path.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
        try:
            foreign = self.manifest.get("arch", hardware.host_arch()) != hardware.host_arch()
            lib_path = tmp / (_TAR if foreign else _LIB)
            if self._exec is not None:
                if foreign:  # .tar: objects only, no cross linker needed
                    self._exec.export_library(str(lib_path))
                else:  # LLVM's debug sections are ~40% of a model's library, and nothing reads them
                    self._exec.export_library(str(lib_path), options=["-Wl,--strip-debug"])
            else:
                shutil.copyfile(Path(self.manifest["_source"]) / self.manifest["library"], lib_path)
            manifest = {k: v for k, v in self.manifest.items() if not k.startswith("_") and k != "weights"}
            weights = b""
            if self._weights is not None and self._weights.count:
                weights = self._weights.blob
                with open(tmp / _WEIGHTS, "wb") as f:
                    f.write(weights)
                    f.flush()
                    os.fsync(f.fileno())
                manifest["weights"] = self._weights.summary()
            manifest["library"] = lib_path.name
            manifest["format"] = FORMAT
            manifest["versions"] = _versions()
            manifest["saved"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            manifest["sha256"] = _digest(lib_path.read_bytes(), manifest, weights)
            with open(tmp / _MANIFEST, "w") as f:
                json.dump(manifest, f, sort_keys=True, separators=(",", ":"))  # compact: the plan lists every channel
                f.flush()
                os.fsync(f.fileno())
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=parent))
                os.replace(path, old / "x")
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def _check_hardware(manifest: dict, file: str | None) -> None:
    """Refuse code this machine cannot run: another architecture, missing ISA
    features (SIGILL otherwise), or a CUDA module without a GPU."""
    arch = manifest.get("arch")
    if arch and arch != hardware.host_arch():
        raise HardwareMismatchError(f"module was built for {arch}, this machine is {hardware.host_arch()}",
                                    file=file, hint="compile for this machine's target, or run it where it belongs")
    missing = hardware.missing_features(manifest.get("required_features", []))
    if missing:
        raise HardwareMismatchError(f"this CPU lacks {', '.join(missing)}, which the module was built to use",
                                    file=file, hint="recompile for this CPU, e.g. target='llvm'")
    if manifest.get("target", {}).get("kind") == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise HardwareMismatchError("module was built for a CUDA GPU and none is visible here", file=file,
                                        hint="run it on a machine with an NVIDIA GPU and driver")


def _numpy_views(buffers) -> list | None:
    """Writable numpy views of CPU tensors (None when numpy cannot view one of
    them through DLPack: the inputs are then copied with ``copyfrom``)."""
    try:
        views = [np.from_dlpack(b) for b in buffers]
    except (TypeError, ValueError, BufferError, RuntimeError):
        return None
    return views if all(v.flags.writeable for v in views) else None


def _to_numpy_list(result) -> list[np.ndarray]:
    """The output tensors as numpy arrays of their own (an output may alias an
    input buffer or a constant). CPU tensors are copied by numpy through a DLPack
    view, several times faster than ``Tensor.numpy()`` for small outputs."""
    if hasattr(result, "numpy"):
        if result.device.dlpack_device_type() == 1:
            return [np.array(np.from_dlpack(result))]
        return [result.numpy()]
    out = []
    for item in result:
        out.extend(_to_numpy_list(item))
    return out


def load(path: str | os.PathLike) -> CompiledModule:
    """Load a saved module with the TVM runtime only, after checking it."""
    path = Path(path)
    man_path = path / _MANIFEST
    if not path.is_dir() or not man_path.is_file():
        raise ArtifactError("not a saved soniq module (needs a directory with manifest.json and the library)",
                            file=str(path), hint="create one with soniq_tvm.compile(...).save(path)")
    try:
        manifest = json.loads(man_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"manifest is unreadable: {e}", file=str(man_path)) from None
    if not isinstance(manifest, dict) or manifest.get("format") not in _READABLE:
        raise ArtifactError(f"manifest format is not one of {', '.join(_READABLE)}", file=str(man_path),
                            hint="recompile and save it with this version")
    lib_path = path / str(manifest.get("library", _LIB))
    if lib_path.name not in (_LIB, _TAR) or not lib_path.is_file():
        raise ArtifactError(f"library {lib_path.name} is missing", file=str(path))
    lib_bytes = lib_path.read_bytes()
    weights_path, weights = path / _WEIGHTS, b""
    if "weights" in manifest:
        if not weights_path.is_file():
            raise ArtifactError(f"{_WEIGHTS} is missing", file=str(path), hint="recompile and save it again")
        weights = weights_path.read_bytes()
    if manifest.get("sha256") != _digest(lib_bytes, manifest, weights):
        raise ArtifactError("content hash does not match: the module was corrupted or modified",
                            file=str(path), hint="recompile and save it again")
    built = manifest.get("versions", {})
    now = _versions()
    for key in ("tvm", "tvm_ffi"):
        if built.get(key) != now[key]:
            raise ArtifactError(f"built with {key} {built.get(key)}, this runtime has {now[key]}",
                                file=str(path), hint="recompile with this installation")
    _check_hardware(manifest, str(path))
    import tvm

    try:
        lib = tvm.runtime.load_module(str(lib_path))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"the library does not load: {str(e).splitlines()[0]}", file=str(lib_path)) from None
    store = None
    if "weights" in manifest:
        from .weights import WeightStore

        try:
            store = WeightStore(manifest["weights"]["entries"], weights)
            store.arrays()  # rebuilt now, timed: errors surface here, not at the first run
        except Exception as e:  # noqa: BLE001  (the hash matched: a codec or family mismatch)
            raise ArtifactError(f"the weights do not rebuild: {e}", file=str(weights_path),
                                hint="recompile with this installation") from None
    manifest["_source"] = str(path)
    return CompiledModule(lib, manifest, weights=store)
