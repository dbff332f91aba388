"""Vectorisable float32 ``exp``, ``erf``, ``tanh`` and ``sigmoid`` for the CPU glue.

On CPU, TVM lowers ``T.exp``/``T.erf``/``T.tanh`` to libm calls (``expf``,
``erff``, ``tanhf``), and LLVM has no vector form of those without a vector math
library: a loop vectorised 16 wide still makes 16 scalar calls per vector. The
GELU epilogue of a transformer FFN and every softmax spend most of their time
there.

:func:`substitute` rewrites those calls in a PrimFunc into plain arithmetic
(``min``/``max``, ``floor``, multiply-adds, one division, an integer shift and
a bit cast), which vectorises like any other expression. The default CPU rules
(:mod:`.generic`) apply it to every function they schedule, so the pipeline and
the tuner's "default schedule" measurement see the same code.

Accuracy (float32, measured against float64 references in
``tests/schedules/test_generic_schedules.py``):

* ``exp``: Cody-Waite range reduction ``x = n ln2 + r`` and Cephes' degree-7
  polynomial of ``exp(r)``; relative error below 1e-7 on [-87, 88]. Inputs are
  clamped to [-88, 88]: below about -87.7 the result is 0 (the exact value is
  a denormal, < 1.2e-38); above 88 it saturates at exp(88) = 1.65e38 (not inf).
* ``erf``: Eigen's rational approximation (odd degree-13 over even degree-8) on
  [-4, 4], +-1 outside; absolute error below 4e-7 (3.7e-7 measured).
* ``tanh``: Eigen's rational approximation (odd degree-13 over even degree-6) on
  [-9, 9], exact ``x`` for |x| < 4e-4; absolute error below 4e-7 (3.1e-7 measured).
* ``sigmoid``: ``1 / (1 + exp(-x))`` with the ``exp`` above.

Other dtypes (float16, float64) are left to TVM.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

__all__ = ["fast_exp", "fast_erf", "fast_tanh", "fast_sigmoid", "substitute", "REWRITTEN"]

tirx = tv.tirx

# Cephes expf: exp(r) ~ 1 + r + r^2 * P(r) on |r| <= ln2 / 2
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln2 = hi + lo, hi with 9 significant bits
_LOG2E = 1.44269504088896341
_EXP_LO, _EXP_HI = -88.0, 88.0  # 2^-127 is encoded as +0: below about -87.7, exp is 0

# Eigen's generic_fast_erf_float: erf(x) ~ x * P(x^2) / Q(x^2) on [-4, 4]
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)

# Eigen's generic_fast_tanh_float: tanh(x) ~ x * P(x^2) / Q(x^2) on [-9, 9]
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_TANH_TINY = 0.0004


def _dtype(expr) -> str:
    return str(expr.ty)  # ``.dtype`` before 0.27


def _c(value: float, like):
    return tirx.const(value, _dtype(like))


def _horner(x, coeffs):
    acc = _c(coeffs[0], x)
    for k in coeffs[1:]:
        acc = acc * x + _c(k, x)
    return acc


def _clamp(x, lo: float, hi: float):
    return tirx.max(tirx.min(x, _c(hi, x)), _c(lo, x))


def _let(x, body_of):
    """``body_of(v)`` with ``v`` bound to ``x`` once (a load or a variable is used as is)."""
    if isinstance(x, (tirx.Var, tirx.FloatImm)) or type(x).__name__ in ("BufferLoad", "TensorLoad"):
        return body_of(x)
    v = tirx.Var("fm_x", _dtype(x))
    return tirx.Let(v, x, body_of(v))


def _int_dtype(x) -> str:
    _, _, lanes = _dtype(x).partition("x")
    return f"int32x{lanes}" if lanes else "int32"


def fast_exp(x):
    """exp(x) for a float32 expression, without a libm call."""
    def body(xc):
        return _let(tirx.floor(xc * _c(_LOG2E, xc) + _c(0.5, xc)), lambda n: _exp_tail(xc, n))
    return _let(_clamp(x, _EXP_LO, _EXP_HI), body)


def _exp_tail(xc, n):
    r = xc - n * _c(_LN2_HI, xc) - n * _c(_LN2_LO, xc)

    def poly(r):
        return _horner(r, _EXP_P) * r * r + r + _c(1.0, r)

    idt = _int_dtype(xc)
    two_n = tirx.reinterpret(_dtype(xc), tirx.shift_left(tirx.Cast(idt, n) + tirx.const(127, idt),
                                                            tirx.const(23, idt)))
    return _let(r, poly) * two_n


def fast_erf(x):
    """erf(x) for a float32 expression, without a libm call."""
    def body(x):
        return _let(_clamp(x, -4.0, 4.0), lambda xc: _let(xc * xc, lambda x2: xc * _horner(x2, _ERF_P)
                                                           / _horner(x2, _ERF_Q)))
    return _let(x, body)


def fast_tanh(x):
    """tanh(x) for a float32 expression, without a libm call."""
    def body(x):
        def ratio(xc):
            return _let(xc * xc, lambda x2: xc * _horner(x2, _TANH_P) / _horner(x2, _TANH_Q))
        return tirx.Select(tirx.abs(x) < _c(_TANH_TINY, x), x, _let(_clamp(x, -9.0, 9.0), ratio))
    return _let(x, body)


def fast_sigmoid(x):
    """1 / (1 + exp(-x)) for a float32 expression, without a libm call."""
    return _c(1.0, x) / (_c(1.0, x) + fast_exp(-x))


_RULES = {"exp": fast_exp, "erf": fast_erf, "tanh": fast_tanh, "sigmoid": fast_sigmoid}
REWRITTEN = tuple(_RULES)  # the intrinsics substitute() replaces
_NAMESPACES = ("tirx", "tir")  # ``tirx.exp`` in 0.27, ``tir.exp`` before


def _rewrite_call(call):
    space, _, name = str(getattr(getattr(call, "op", None), "name", "")).rpartition(".")
    if space in _NAMESPACES and name in _RULES and len(call.args) == 1 and _dtype(call).split("x")[0] == "float32":
        return _RULES[name](call.args[0])
    return call


def substitute(func):
    """``func`` with every float32 exp/erf/tanh/sigmoid replaced by the
    vectorisable forms above (``func`` itself when it has none)."""
    return tv.structural_map(func, [(tv.tvm.ir.expr.Call, _rewrite_call)])
