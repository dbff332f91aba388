"""SONIQ quantized layers: :class:`QConv2d`, :class:`QLinear` and :class:`QMatMul`.

Each layer quantizes its input activation (one learned scale per tensor, per-channel
integer ranges) and its weight (one learned scale per output channel, symmetric,
per-channel integer ranges). Precision is chosen per channel from a palette:

* tied (``weight_axis="in"``, SONIQ's main case): one precision per *input* channel,
  shared by the activation channel and the weight slice that multiplies it;
* ``weight_axis="out"``: one precision per output channel for the weight and its own
  per-input-channel precision for the activation.

A layer runs in one of two modes:

* **noise** (training, before :func:`~soniq_tvm.torch.snap`): precisions are continuous
  and learnable; values get the quantizer's noise (:func:`.quant.noise_quant`);
* **hard** (after snapping, and always in eval mode): integer bit widths, real
  rounding and clipping (:func:`.quant.fake_quant`, straight-through in training).
  Before snapping, eval mode uses each channel's nearest palette level.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .quant import cont_range, fake_quant, int_range, noise_quant, quantize_int

__all__ = ["Precision", "ActQuant", "QConv2d", "QLinear", "QMatMul"]

_CALIB_SAMPLES = 1 << 16  # elements per tensor used to initialise an activation scale


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


class Precision(nn.Module):
    """Per-channel bit widths drawn from ``palette``.

    Before snapping, channel ``c`` has the continuous precision
    ``b_c = min + (max - min) * sigmoid(logit_c)`` (learnable); after
    :meth:`snap` it holds one palette level per channel (``bits`` buffer). A palette
    with a single level is snapped from the start (a fixed precision).
    """

    #: the logit is stored divided by this gain, so that optimisers at weight learning
    #: rates (Adam, 1e-3) move precisions at a useful pace
    GAIN = 50.0

    def __init__(self, channels: int, palette: tuple[int, ...], init_bits: float | None = None):
        super().__init__()
        self.palette = tuple(sorted(set(int(b) for b in palette)))
        lo, hi = self.palette[0], self.palette[-1]
        if init_bits is None:
            init_bits = (lo + hi) / 2
        p = 0.5 if hi == lo else (init_bits - lo) / (hi - lo)
        self.logit = nn.Parameter(torch.full((channels,), _logit(p) / self.GAIN))
        self.register_buffer("bits", torch.full((channels,), hi, dtype=torch.int64))
        self.register_buffer("snapped", torch.tensor(len(self.palette) == 1))
        if len(self.palette) == 1:
            self.logit.requires_grad_(False)

    @property
    def channels(self) -> int:
        return self.logit.numel()

    @property
    def is_snapped(self) -> bool:
        return bool(self.snapped)

    def continuous(self) -> torch.Tensor:
        """Differentiable precision in bits (the integer bits once snapped)."""
        if self.is_snapped:
            return self.bits.to(torch.float32)
        lo, hi = self.palette[0], self.palette[-1]
        return lo + (hi - lo) * torch.sigmoid(self.GAIN * self.logit)

    def nearest(self) -> torch.Tensor:
        """Integer bits: the snapped ones, else each channel's nearest palette level."""
        if self.is_snapped:
            return self.bits.clone()
        levels = torch.tensor(self.palette, dtype=torch.float32, device=self.logit.device)
        b = self.continuous().detach()
        return levels[torch.argmin((b[:, None] - levels[None, :]).abs(), dim=1)].to(torch.int64)

    def current(self, hard: bool) -> torch.Tensor:
        return self.nearest().to(torch.float32) if hard else self.continuous()

    @torch.no_grad()
    def snap(self, bits: torch.Tensor | None = None) -> None:
        """Fix each channel to ``bits`` (default: the nearest palette level)."""
        b = self.nearest() if bits is None else torch.as_tensor(bits, dtype=torch.int64)
        bad = [int(v) for v in b.unique() if int(v) not in self.palette]
        if bad:
            raise ValueError(f"bits {bad} are not in the palette {self.palette}")
        self.bits.copy_(b.to(self.bits.device))
        self.snapped.fill_(True)
        self.logit.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, palette={self.palette}, snapped={self.is_snapped}"


def _mse_scale(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, signed_bipolar: torch.Tensor | None,
               top: float) -> torch.Tensor:
    """Scale minimising the rounding + clipping error of ``x`` (rows: independent
    tensors sharing nothing; columns: elements with per-element ranges ``lo``/``hi``).

    ``x``: ``[R, N]``; ``lo``/``hi`` broadcast to it. Returns ``[R]`` scales.
    Candidates: ``amax / k`` for ``k`` log-spaced over ``[0.5, 2 * top]``.
    """
    amax = x.abs().amax(dim=1).clamp_min(1e-8)
    ks = torch.logspace(math.log10(0.5), math.log10(max(2.0 * top, 1.0)), 96)
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for k in ks:
        s = (amax / k)[:, None]
        v = x / s
        q = torch.minimum(torch.maximum(torch.round(v), lo), hi)
        if signed_bipolar is not None:
            q = torch.where(signed_bipolar, torch.where(v >= 0, 1.0, -1.0), q)
        err = ((q * s - x) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s[:, 0], best)
    return best


ACT_SCALES = ("group", "tensor", "channel")


class ActQuant(nn.Module):
    """Activation quantizer: learned steps, per-channel ranges.

    ``axis``: the channel axis (1 for NCHW, -1 for ``[..., features]``, -2 for the right
    operand of a matmul). ``signed``: ``True``/``False``, or ``None`` to decide on the
    first batch (unsigned if it has no negative value). ``levels``: the palette of
    the channels' widths; with two or more, each level has its own step (one step
    per precision group, what the compiler runs as one integer kernel per group)
    and a channel between levels (before snapping) uses the log-linear mix of its
    neighbours' steps; empty: one step per tensor, or with ``channels`` one step per
    channel (what a per-channel calibration exports; more than a few distinct steps
    run in float in the compiler). The steps are initialised on the first batch by a
    rounding + clipping error search and learned afterwards (log-parameterised, LSQ
    gradients).
    """

    def __init__(self, axis: int, signed: bool | None, levels: tuple[int, ...] = (), channels: int = 0):
        super().__init__()
        self.axis = axis
        self.levels = tuple(sorted(set(int(v) for v in levels))) if len(set(levels)) > 1 else ()
        self.channels = 0 if self.levels else int(channels)
        shape = (len(self.levels),) if self.levels else (self.channels,) if self.channels else ()
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed_flag", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))

    @property
    def signed(self) -> bool:
        if int(self.signed_flag) < 0:
            raise RuntimeError("activation signedness is decided on the first batch; run the model once")
        return bool(int(self.signed_flag))

    def scale(self) -> torch.Tensor:
        """The step per tensor, or one per level (``levels``) or channel."""
        return torch.exp(self.log_scale)

    def channel_scale(self, bits: torch.Tensor) -> torch.Tensor:
        """One step per channel of width ``bits`` (palette levels, or between them
        while precisions are still being learned); a scalar per tensor."""
        if not self.levels:  # per tensor, or per channel
            return torch.exp(self.log_scale)
        lv = torch.tensor(self.levels, dtype=torch.float32, device=self.log_scale.device)
        b = bits.reshape(-1).to(torch.float32).clamp(lv[0], lv[-1])
        hi = torch.searchsorted(lv, b.detach(), right=True).clamp(1, len(self.levels) - 1)
        t = (b - lv[hi - 1]) / (lv[hi] - lv[hi - 1])
        return torch.exp((1 - t) * self.log_scale[hi - 1] + t * self.log_scale[hi])

    def effective_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Signed activations have no 1-bit form: they use at least 2 bits."""
        return torch.clamp(bits, min=2.0) if self.signed else bits

    def _shape(self, bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if bits.numel() == 1:
            return bits.reshape(())
        shape = [1] * x.dim()
        shape[self.axis] = bits.numel()
        return bits.reshape(shape)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, bits: torch.Tensor) -> None:
        if int(self.signed_flag) < 0:
            self.signed_flag.fill_(int(bool((x < 0).any())))
        flat = x.detach().reshape(-1)
        if flat.numel() > _CALIB_SAMPLES:
            g = torch.Generator().manual_seed(0)
            pick = torch.randperm(flat.numel(), generator=g)[:_CALIB_SAMPLES]
        else:
            pick = None

        def fit(widths: torch.Tensor) -> torch.Tensor:  # the step for these per-channel widths
            lo, hi, _ = cont_range(self._shape(self.effective_bits(widths), x), self.signed)
            lo, hi = torch.broadcast_to(lo, x.shape).reshape(-1), torch.broadcast_to(hi, x.shape).reshape(-1)
            v = flat
            if pick is not None:
                v, lo, hi = v[pick], lo[pick], hi[pick]
            return _mse_scale(v[None].float(), lo[None], hi[None], None, float(hi.max()))[0]

        if self.levels:  # each level's step as if every channel had that width
            steps = [fit(torch.full_like(bits.detach(), float(level))) for level in self.levels]
            self.log_scale.copy_(torch.log(torch.stack(steps)))
        elif self.channels:  # each channel's own step: one row of the search per channel
            rows = x.detach().movedim(self.axis, 0).reshape(self.channels, -1).float()
            if rows.shape[1] > _CALIB_SAMPLES // self.channels:
                g = torch.Generator().manual_seed(0)
                rows = rows[:, torch.randperm(rows.shape[1], generator=g)[:max(1, _CALIB_SAMPLES // self.channels)]]
            widths = self.effective_bits(torch.broadcast_to(bits.detach().reshape(-1), (self.channels,)))
            lo, hi, _ = cont_range(widths[:, None], self.signed)
            self.log_scale.copy_(torch.log(_mse_scale(rows, lo, hi, None, float(hi.max()))))
        else:
            self.log_scale.copy_(torch.log(fit(bits.detach())))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor, bits: torch.Tensor, hard: bool) -> torch.Tensor:
        if not bool(self.initialized):
            self.calibrate(x, bits)
        b = self._shape(self.effective_bits(bits), x)
        s = self.channel_scale(bits)
        if s.dim():
            s = self._shape(s, x)
        if hard:
            return fake_quant(x, s, b, self.signed)
        return noise_quant(x, s, b, self.signed)

    def extra_repr(self) -> str:
        sf = int(self.signed_flag)
        steps = f"steps per level {self.levels}" if self.levels else \
            f"a step per channel ({self.channels})" if self.channels else "one step"
        return f"axis={self.axis}, signed={'auto' if sf < 0 else bool(sf)}, {steps}"


class _QWeightLayer(nn.Module):
    """Shared machinery of :class:`QConv2d` and :class:`QLinear`."""

    #: axis of the weight tensor holding input channels
    _in_axis = 1
    _act_axis = 1

    def _init_quant(self, palette, weight_axis: str, init_bits, act_signed, act_scales: str = "group"):
        if weight_axis not in ("in", "out"):
            raise ValueError(f"weight_axis must be 'in' (tied) or 'out', not {weight_axis!r}")
        if act_scales not in ACT_SCALES:
            raise ValueError(f"act_scales must be one of {ACT_SCALES}, not {act_scales!r}")
        self.palette = tuple(sorted(set(int(b) for b in palette)))
        self.weight_axis = weight_axis
        out_ch, in_ch = self.weight.shape[0], self.weight.shape[1]
        if weight_axis == "in":
            self.w_prec = Precision(in_ch, palette, init_bits)
            self.a_prec = None  # tied: the activation uses w_prec
        else:
            self.w_prec = Precision(out_ch, palette, init_bits)
            self.a_prec = Precision(in_ch, palette, init_bits)
        self.act = ActQuant(self._act_axis, act_signed, self.palette if act_scales == "group" else (),
                            in_ch if act_scales == "channel" else 0)
        self.w_log_scale = nn.Parameter(torch.zeros(out_ch))
        self.init_weight_scale()

    # ---- precision ------------------------------------------------------------
    @property
    def act_precision(self) -> Precision:
        return self.w_prec if self.a_prec is None else self.a_prec

    def precisions(self) -> list[Precision]:
        return [self.w_prec] if self.a_prec is None else [self.w_prec, self.a_prec]

    @property
    def is_snapped(self) -> bool:
        return all(p.is_snapped for p in self.precisions())

    def _hard(self) -> bool:
        return (not self.training) or self.is_snapped

    def weights_per_channel(self) -> int:
        """Weight elements that one entry of ``w_prec`` covers."""
        return self.weight.numel() // self.w_prec.channels

    def _w_bits_shape(self, bits: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.weight.dim()
        axis = self._in_axis if self.weight_axis == "in" else 0
        shape[axis] = bits.numel()
        return bits.reshape(shape)

    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel weight scale, shaped to broadcast against the weight."""
        return torch.exp(self.w_log_scale).reshape([-1] + [1] * (self.weight.dim() - 1))

    @torch.no_grad()
    def init_weight_scale(self) -> None:
        """Set each output channel's scale to minimise its rounding + clipping error at
        the current bit widths (continuous before snapping, integer after)."""
        snapped = self.w_prec.is_snapped
        bits = self._w_bits_shape(self.w_prec.continuous().detach())
        bits = torch.broadcast_to(bits, self.weight.shape).reshape(self.weight.shape[0], -1)
        if snapped:
            (lo, hi), bip = int_range(bits, True), bits <= 1
        else:
            (lo, hi, _), bip = cont_range(bits, True), None
        w = self.weight.detach().reshape(self.weight.shape[0], -1).float()
        self.w_log_scale.copy_(torch.log(_mse_scale(w, lo, hi, bip, float(hi.max()))))

    # ---- quantizers -------------------------------------------------------------
    def quant_weight(self) -> torch.Tensor:
        hard = self._hard()
        bits = self._w_bits_shape(self.w_prec.current(hard))
        s = self.weight_scale()
        return fake_quant(self.weight, s, bits, True) if hard else noise_quant(self.weight, s, bits, True)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        hard = self._hard()
        return self.act(x, self.act_precision.current(hard), hard)

    # ---- export view ------------------------------------------------------------
    @torch.no_grad()
    def export_weight(self):
        """``(int8 weight, float32 scale [O], bits list, bits axis of the weight)``
        exactly as the eval-mode forward computes them."""
        bits = self.w_prec.nearest()
        scale = self.weight_scale()
        q = quantize_int(self.weight.detach(), scale, self._w_bits_shape(bits), True)
        axis = self._in_axis if self.weight_axis == "in" else 0
        return (q.to(torch.int8).cpu().numpy(), scale.reshape(-1).float().cpu().numpy(),
                [int(b) for b in bits], axis)

    @torch.no_grad()
    def export_act(self):
        """``(step: a float, or float32 [C] with one step per channel, bits list,
        signed)`` of the input quantizer (eval semantics)."""
        nearest = self.act_precision.nearest().to(torch.float32)
        bits = self.act.effective_bits(nearest)
        steps = self.act.channel_scale(nearest).float().cpu().numpy().reshape(-1)
        step = float(steps[0]) if len(set(steps.tolist())) == 1 else steps.astype("float32")
        return (step, [int(b) for b in bits], self.act.signed)


class QConv2d(_QWeightLayer):
    """A SONIQ-quantized ``nn.Conv2d`` (zero padding, ``groups=1``)."""

    _in_axis = 1
    _act_axis = 1

    def __init__(self, conv: nn.Conv2d, palette=(2, 8), weight_axis: str = "in",
                 init_bits: float | None = None, act_signed: bool | None = None, act_scales: str = "group"):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self._init_quant(palette, weight_axis, init_bits, act_signed, act_scales)

    def pads(self, in_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """ONNX pads ``(top, left, bottom, right)`` for an input of size ``in_hw``."""
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0, 0, 0)
            pads = []
            for k, d in zip(self.kernel_size, self.dilation):  # "same", stride 1
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return (pads[0][0], pads[1][0], pads[0][1], pads[1][1])
        ph, pw = self.padding
        return (ph, pw, ph, pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quant_input(x), self.quant_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, palette={self.palette}, "
                f"weight_axis={self.weight_axis!r}")


class QLinear(_QWeightLayer):
    """A SONIQ-quantized ``nn.Linear`` (input ``[..., in_features]``)."""

    _in_axis = 1
    _act_axis = -1

    def __init__(self, linear: nn.Linear, palette=(2, 8), weight_axis: str = "in",
                 init_bits: float | None = None, act_signed: bool | None = None, act_scales: str = "group"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self._init_quant(palette, weight_axis, init_bits, act_signed, act_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"palette={self.palette}, weight_axis={self.weight_axis!r}")


class QMatMul(nn.Module):
    """``a @ b`` of two activations (attention scores and context), both quantized
    with one fixed bit width and one learned scale per tensor (the compiler folds
    activation-activation matmuls with scalar scales). Not part of the weight budget.
    """

    def __init__(self, bits: int = 8, a_signed: bool | None = None, b_signed: bool | None = None):
        super().__init__()
        self.bits = int(bits)
        self.a_prec = Precision(1, (self.bits,))
        self.b_prec = Precision(1, (self.bits,))
        self.act_a = ActQuant(-1, a_signed)
        self.act_b = ActQuant(-2, b_signed)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # fixed precision: real rounding in every mode (straight-through in training)
        return torch.matmul(self.act_a(a, self.a_prec.current(True), True),
                            self.act_b(b, self.b_prec.current(True), True))

    @torch.no_grad()
    def export_operands(self):
        """``[(scale, bits, signed)]`` for ``a`` and ``b``."""
        out = []
        for act, prec in ((self.act_a, self.a_prec), (self.act_b, self.b_prec)):
            bits = int(act.effective_bits(prec.nearest().to(torch.float32))[0])
            out.append((float(act.scale()), bits, act.signed))
        return out

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
