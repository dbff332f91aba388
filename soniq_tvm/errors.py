"""Typed errors. Every user-facing failure of soniq-tvm raises a subclass of
:class:`SoniqError` that names what is at fault (node, tensor, channel, file) and
what to do about it.

``assert`` is used only for internal invariants; anything a user can cause goes
through one of these classes.
"""
from __future__ import annotations

__all__ = [
    "SoniqError",
    "ModelLoadError",
    "AnnotationError",
    "UnsupportedModelError",
    "TargetError",
    "InputError",
    "ArtifactError",
    "HardwareMismatchError",
    "TuningDatabaseError",
    "ExportError",
    "ResourceLimitError",
]


class SoniqError(Exception):
    """Base class of every error soniq-tvm raises on bad input.

    ``message`` says what is wrong; the keyword fields name the offender and are
    kept as attributes so callers (and tests) can inspect them.
    """

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        tensor: str | None = None,
        channel: int | None = None,
        file: str | None = None,
        hint: str | None = None,
    ):
        self.message = message
        self.node = node
        self.tensor = tensor
        self.channel = channel
        self.file = file
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file!r}")
        if self.node is not None:
            where.append(f"node {self.node!r}")
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        if self.channel is not None:
            where.append(f"channel {self.channel}")
        text = (", ".join(where) + ": " if where else "") + self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ModelLoadError(SoniqError):
    """The ONNX file cannot be read, or is not a valid ONNX model."""


class AnnotationError(SoniqError):
    """The soniq-qdq/1 precision annotations are malformed or contradict the graph."""


class UnsupportedModelError(SoniqError):
    """The model uses an operator, opset or shape the compiler cannot handle."""


class TargetError(SoniqError):
    """The target string, dict or object is not valid."""


class InputError(SoniqError):
    """Run-time inputs do not match the compiled module (names, shapes, dtypes)."""


class ArtifactError(SoniqError):
    """A saved module is missing, corrupted, tampered with, or from other versions."""


class HardwareMismatchError(ArtifactError):
    """A saved module needs CPU/GPU features this machine does not have."""


class TuningDatabaseError(SoniqError):
    """A tuning database file is unreadable, truncated, or foreign."""


class ExportError(SoniqError):
    """The PyTorch side cannot quantize or export a module."""


class ResourceLimitError(SoniqError):
    """The model would need more memory (constants and live tensors) than the bound."""
