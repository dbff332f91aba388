"""soniq-tvm: compile SONIQ per-channel mixed-precision ONNX models with TVM.

::

    import soniq_tvm
    m = soniq_tvm.compile("model.onnx", target="llvm -mcpu=skylake-avx512")
    m.save("model.soniq")
    m = soniq_tvm.load("model.soniq")      # runtime only: no onnx, no passes
    y = m.run({"x": x})

Importing this package is cheap and side-effect free: TVM, onnx and the compiler
are imported the first time a function that needs them is called, and torch,
onnxruntime and matplotlib only by the optional parts that use them.
"""
from __future__ import annotations

from .errors import (
    AnnotationError,
    ArtifactError,
    ExportError,
    HardwareMismatchError,
    InputError,
    ModelLoadError,
    ResourceLimitError,
    SoniqError,
    TargetError,
    TuningDatabaseError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "compile",
    "tune",
    "load",
    "inspect",
    "verify",
    "parse_target",
    "CompiledModule",
    "Plan",
    "SoniqError",
    "ModelLoadError",
    "AnnotationError",
    "UnsupportedModelError",
    "TargetError",
    "ResourceLimitError",
    "InputError",
    "ArtifactError",
    "HardwareMismatchError",
    "TuningDatabaseError",
    "ExportError",
    "__version__",
]

# name -> (module, attribute); resolved on first use so `import soniq_tvm` stays lean.
_LAZY = {
    "compile": ("soniq_tvm.compiler", "compile"),
    "inspect": ("soniq_tvm.compiler", "inspect"),
    "verify": ("soniq_tvm.verify", "verify"),
    "load": ("soniq_tvm.artifact", "load"),
    "CompiledModule": ("soniq_tvm.artifact", "CompiledModule"),
    "Plan": ("soniq_tvm.plan", "Plan"),
    "parse_target": ("soniq_tvm.targets", "parse_target"),
    "tune": ("soniq_tvm.tuning", "tune"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'soniq_tvm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
