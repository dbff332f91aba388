"""CPU kernel families: int8-class dot products (AVX2 ``vpmaddubsw`` / AVX-512 VNNI
``vpdpbusd`` / NEON ``sdot``) and bit-serial AND + popcount kernels.

Importing registers them with :mod:`soniq_tvm.schedules.registry` (after the
reference families, whichever module is imported first); each family's ``cost``
answers ``None`` unless the target has the instructions it is written with.
Depthwise convolutions (one input channel per group) are not taken by these
families yet: they fall back to ``bitplane-ref``.
"""
from __future__ import annotations

from .. import reference  # noqa: F401  (registers int8-ref and bitplane-ref first)
from ..registry import register
from .bitserial import BITSERIAL
from .int8dot import AVX2_DOT, AVX512_VNNI_DOT, NEON_SDOT

for _family in (AVX2_DOT, AVX512_VNNI_DOT, NEON_SDOT, BITSERIAL):
    register(_family)
