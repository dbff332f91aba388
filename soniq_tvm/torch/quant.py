"""Quantizer arithmetic shared by every SONIQ module: integer ranges, the hard
quantizer the compiled kernels compute, its straight-through twin for training, and
the phase-1 noise model.

The compiler's integer semantics (and ONNX Runtime's, on the exported file) are

    q = clamp(round_half_to_even(x / s), lo_c, hi_c),     x_hat = q * s

with one scale ``s`` per activation tensor and one per weight output channel, zero
point 0, and a per-channel integer range ``[lo_c, hi_c]`` set by that channel's bit
width ``b`` (:func:`int_range`). Signed 1-bit weights are bipolar: ``q = +1`` if
``x >= 0`` else ``-1``.

Because the scale is shared by all channels of a tensor (or a weight row), a channel's
precision does not change its step, only its range. The phase-1 noise model follows
that rule exactly: ``x_tilde = clamp(x / s + u * m(b), lo(b), hi(b)) * s`` with ``u``
uniform in ``[-1/2, 1/2)``, where ``lo``, ``hi`` are the range formulas evaluated at
the channel's *continuous* precision ``b`` and ``m(b)`` is the integer step (1, except
between bipolar 1 bit and 2 bits, where the grid goes from spacing 2 to spacing 1).
At every integer ``b`` the noise has the spread and clipping of the real quantizer.

Everything here is plain tensor code (no module state), so tests can check it against
numpy directly.
"""
from __future__ import annotations

import torch

__all__ = [
    "int_range",
    "cont_range",
    "quantize_int",
    "fake_quant",
    "noise_quant",
    "round_ste",
]


def int_range(bits: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer range ``(lo, hi)`` of integer bit widths (float tensors, same shape).

    signed ``b >= 2``: ``[-2^(b-1), 2^(b-1)-1]``; signed 1 bit: bipolar ``[-1, 1]``
    (only -1 and +1 occur); unsigned: ``[0, 2^b-1]``.
    """
    b = bits.to(torch.float32)
    if signed:
        lo = -torch.exp2(b - 1)
        hi = torch.where(b >= 2, torch.exp2(b - 1) - 1, torch.ones_like(b))
    else:
        lo = torch.zeros_like(b)
        hi = torch.exp2(b) - 1
    return lo, hi


def cont_range(bits: torch.Tensor, signed: bool):
    """``(lo, hi, m)`` at a continuous precision: the range formulas of
    :func:`int_range` evaluated at real ``b``, and the integer step ``m``.

    Signed between 1 and 2 bits the grid moves from bipolar ``{-1, +1}`` (range
    ``[-1, 1]``, spacing 2) to ``{-2, -1, 0, 1}`` (spacing 1): ``lo = -2^(b-1)``,
    ``hi = 1``, ``m = 2^(2-b)``. Differentiable in ``bits`` everywhere.
    """
    b = bits
    if signed:
        lo = -torch.exp2(b - 1)
        hi = torch.where(b >= 2, torch.exp2(b - 1) - 1, torch.ones_like(b))
        m = torch.where(b >= 2, torch.ones_like(b), torch.exp2(2 - b))
    else:
        lo = torch.zeros_like(b)
        hi = torch.exp2(b) - 1
        m = torch.ones_like(b)
    return lo, hi, m


def quantize_int(x: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor, signed: bool) -> torch.Tensor:
    """The integers the compiled kernels see (float tensor holding integers).

    ``scale`` and ``bits`` broadcast against ``x``; ``bits`` are integers.
    """
    v = x / scale
    lo, hi = int_range(bits, signed)
    q = torch.minimum(torch.maximum(torch.round(v), lo), hi)
    if signed:
        bipolar = torch.where(v >= 0, torch.ones_like(v), -torch.ones_like(v))
        q = torch.where(bits.to(torch.float32) == 1, bipolar, q)
    return q


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return v + (torch.round(v) - v).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor, signed: bool) -> torch.Tensor:
    """``quantize_int(x) * scale`` forward; straight-through (LSQ) gradients backward.

    Gradient to ``x``: 1 inside the channel's range, 0 outside. Gradient to ``scale``:
    ``q - x/s`` inside, the clipped bound outside (Esser et al., LSQ).
    """
    v = x / scale
    lo, hi = int_range(bits, signed)
    vc = torch.minimum(torch.maximum(v, lo), hi)
    q = torch.round(vc)
    if signed:
        bipolar = torch.where(v >= 0, torch.ones_like(v), -torch.ones_like(v))
        q = torch.where(bits.to(torch.float32) == 1, bipolar, q)
    return (vc + (q - vc).detach()) * scale


def noise_quant(x: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor, signed: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Phase-1 surrogate: ``clamp(x/s + u*m(b), lo(b), hi(b)) * s``, ``u ~ U[-1/2, 1/2)``.

    ``bits`` is continuous and receives gradient through the range and the step.
    """
    v = x / scale
    lo, hi, m = cont_range(bits, signed)
    u = torch.rand(v.shape, dtype=v.dtype, device=v.device, generator=generator) - 0.5
    return torch.minimum(torch.maximum(v + u * m, lo), hi) * scale
