"""CPU kernel families: int8-class dot products (AVX2 ``vpmaddubsw`` / AVX-512 VNNI
``vpdpbusd`` / NEON ``sdot``), the same dot products on weights packed at their real
width (1-4 bits, expanded in registers: :mod:`.lowbit`), bit-serial AND + popcount
kernels, lookup-table matmuls (1-4-bit weight planes indexing tables of activation
partial sums with ``vpshufb`` / NEON ``tbl``: :mod:`.lut`), depthwise
convolutions (:mod:`.depthwise`) and integer Winograd F(2x2, 3x3) for low-bit 3x3
convolutions (:mod:`.winograd`).

Importing registers them with :mod:`soniq_tvm.schedules.registry` (after the
reference families, whichever module is imported first); each family's ``cost``
answers ``None`` unless the target has the instructions it is written with.
"""
from __future__ import annotations

from .. import reference  # noqa: F401  (registers int8-ref and bitplane-ref first)
from ..registry import register
from .bitserial import BITSERIAL
from .depthwise import DEPTHWISE
from .int8dot import AVX2_DOT, AVX512_VNNI_DOT, NEON_SDOT
from .lowbit import AVX2_LOWBIT, AVX512_LOWBIT, AVXVNNI_LOWBIT
from .lut import AVX2_LUT, AVX512_LUT, NEON_LUT
from .winograd import AVX2_WINOGRAD, AVX512_WINOGRAD

for _family in (AVX2_DOT, AVX512_VNNI_DOT, NEON_SDOT, BITSERIAL, AVX512_LOWBIT, AVXVNNI_LOWBIT, AVX2_LOWBIT,
                AVX512_LUT, AVX2_LUT, NEON_LUT, DEPTHWISE, AVX512_WINOGRAD, AVX2_WINOGRAD):
    register(_family)
