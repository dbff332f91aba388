"""ONNX files in and out: load with a check, save atomically.

Every path a user hands the compiler goes through :func:`load_model`, so a
missing, unreadable, non-ONNX or invalid file is a :class:`ModelLoadError`
naming it; :func:`save_model` never leaves half a file behind. numpy-free;
needs onnx only.
"""
from __future__ import annotations

import os
import tempfile

import onnx

from .errors import ModelLoadError

__all__ = ["check_model", "load_model", "save_model", "as_model"]

_PROTOBUF_LIMIT = 2**31 - 1

def check_model(model: onnx.ModelProto, *, file: str | None = None) -> None:
    """Run ``onnx.checker`` with ``full_check`` (strict shape inference).

    A model over 2 GB can only be checked through its ``file``. Raises
    :class:`ModelLoadError` naming ``file`` and the checker's complaint.
    """
    target: onnx.ModelProto | str = model
    if file is not None and model.ByteSize() > _PROTOBUF_LIMIT and os.path.exists(file):
        target = file
    try:
        onnx.checker.check_model(target, full_check=True)
    except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, ValueError
        raise ModelLoadError(f"onnx.checker failed: {e}", file=file) from None


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (and its external data) and check it.

    Raises :class:`ModelLoadError` naming the file when it is missing, unreadable,
    not ONNX, or fails ``onnx.checker``.
    """
    file = os.fspath(path)
    if not os.path.exists(file):
        raise ModelLoadError("no such file", file=file)
    if os.path.isdir(file):
        raise ModelLoadError("is a directory, not an ONNX file", file=file)
    try:
        model = onnx.load(file)
    except OSError as e:
        raise ModelLoadError(f"cannot read: {e.strerror or e}", file=file) from None
    except Exception as e:  # noqa: BLE001 - DecodeError and friends
        raise ModelLoadError(
            f"not an ONNX model ({type(e).__name__}: {e})", file=file
        ) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(
            "not an ONNX model (no graph or IR version)",
            file=file,
            hint="the bytes parse as protobuf but hold no model",
        )
    check_model(model, file=file)
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Check ``model`` fully, then write it atomically to ``path``.

    The bytes go to a temporary file in the same folder that replaces ``path``
    only once it is complete, so a reader never sees half a model and a failed
    write leaves nothing behind.
    """
    file = os.fspath(path)
    check_model(model, file=file)
    try:
        data = model.SerializeToString()
    except ValueError as e:
        raise ModelLoadError(
            f"cannot serialize: {e}", file=file, hint="models over 2 GB need external data"
        ) from None
    folder = os.path.dirname(os.path.abspath(file))
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(file)}.", suffix=".tmp", dir=folder
        )
    except OSError as e:
        raise ModelLoadError(f"cannot write: {e.strerror or e}", file=file) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except OSError as e:
        _unlink_quietly(tmp)
        raise ModelLoadError(f"cannot write: {e.strerror or e}", file=file) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def as_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_model(model_or_path)
    raise TypeError(
        f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}"
    )
