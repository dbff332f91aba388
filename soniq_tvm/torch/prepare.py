"""Turn a float model into a SONIQ QAT model, push it toward a bit budget, snap it.

:func:`prepare` traces the model with ``torch.fx``, folds each BatchNorm2d into the
Conv2d before it, swaps Conv2d/Linear for :class:`~.modules.QConv2d`/
:class:`~.modules.QLinear`, replaces activation-activation matmuls (attention) with
:class:`~.modules.QMatMul`, and decides which activations are unsigned (those that
come from a ReLU through sign-preserving ops). The result is a ``GraphModule`` with
the same submodule paths as the input; its configuration is ``qmodel.soniq_config``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from soniq_tvm.errors import ExportError

from .modules import QConv2d, QLinear, QMatMul, _QWeightLayer

__all__ = ["QATConfig", "prepare", "snap", "bit_penalty", "average_bits", "bit_report", "quant_layers"]

CONFIG_VERSION = 1


@dataclass(frozen=True)
class QATConfig:
    """How a model was prepared (``qmodel.soniq_config``)."""

    palette: tuple[int, ...]
    target_bits: float | None
    weight_axis: str = "in"
    penalty: float = 1.0
    matmul_bits: int = 8
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "QATConfig":
        if d.get("version") != CONFIG_VERSION:
            raise ValueError(f"QATConfig version {d.get('version')} is not {CONFIG_VERSION}")
        return cls(**{**d, "palette": tuple(d["palette"])})


# modules that are kept as they are (exported as float ops) ---------------------
_PASSIVE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.Softmax, nn.MaxPool2d,
            nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.LayerNorm)
# ops through which a non-negative tensor stays non-negative
_SIGN_KEEP_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout,
                      nn.Identity)
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax)
_NONNEG_FUNCS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.softmax, F.softmax}
_NONNEG_METHODS = {"relu", "sigmoid", "softmax"}
_SIGN_KEEP_FUNCS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, F.max_pool2d,
                    F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout, torch.mean, torch.squeeze,
                    torch.unsqueeze, operator.getitem}
_SIGN_KEEP_METHODS = {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "mean",
                      "squeeze", "unsqueeze"}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm}
_WEIGHT_FUNCS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.embedding,
                 F.batch_norm}


def _module_path(node: fx.Node) -> str:
    """Path of the innermost module whose forward created ``node`` ("" for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    for value in reversed(list(stack.values())):
        if isinstance(value, tuple) and value and isinstance(value[0], str):
            return value[0]
    return ""


def _owner(node: fx.Node) -> str:
    """How errors name a node: its module path, plus the op for functional calls."""
    if node.op == "call_module":
        return str(node.target)
    path = _module_path(node)
    return f"{path}:{node.name}" if path else node.name


def _check_modules(model: nn.Module) -> None:
    """Every leaf module with parameters must be one prepare knows how to handle."""
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.MultiheadAttention, nn.RNNBase, nn.Embedding, nn.EmbeddingBag)):
            raise ExportError(f"{type(mod).__name__} is not supported", node=name or "<root>",
                              hint="write attention with nn.Linear projections and torch.matmul; "
                                   "feed embeddings as float inputs")
        if any(True for _ in mod.children()):
            continue
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                raise ExportError(f"Conv2d with groups={mod.groups} is not supported", node=name,
                                  hint="only groups=1 convolutions are quantized")
            if mod.padding_mode != "zeros":
                raise ExportError(f"Conv2d padding_mode={mod.padding_mode!r} is not supported",
                                  node=name, hint="use zero padding")
            continue
        if isinstance(mod, (nn.Linear, nn.BatchNorm2d, *_PASSIVE)):
            continue
        has_state = any(True for _ in mod.parameters(recurse=False)) or \
            any(True for _ in mod.buffers(recurse=False))
        if has_state:
            raise ExportError(f"{type(mod).__name__} is not supported by SONIQ QAT", node=name,
                              hint="supported layers: Conv2d, Linear, BatchNorm2d after a Conv2d, "
                                   "LayerNorm and parameter-free activations/pooling")


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


@torch.no_grad()
def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (running statistics, eval semantics) into ``conv`` in place."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv)
    beta = bn.bias if bn.affine else torch.zeros_like(inv)
    factor = gamma * inv
    conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = beta + (bias - bn.running_mean) * factor
    conv.bias = nn.Parameter(new_bias.clone())


class _Signs:
    """Which fx nodes are provably non-negative."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.memo: dict[fx.Node, bool] = {}

    def nonneg(self, node) -> bool:
        if not isinstance(node, fx.Node):
            return isinstance(node, (int, float)) and node >= 0
        if node not in self.memo:
            self.memo[node] = False  # cycles cannot occur in fx graphs; guard anyway
            self.memo[node] = self._compute(node)
        return self.memo[node]

    def _compute(self, node: fx.Node) -> bool:
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if isinstance(mod, _NONNEG_MODULES):
                return True
            if isinstance(mod, _SIGN_KEEP_MODULES):
                return self.nonneg(first)
            return False
        if node.op == "call_function":
            if node.target in _NONNEG_FUNCS:
                return True
            if node.target in _SIGN_KEEP_FUNCS:
                return self.nonneg(first)
            if node.target in (operator.add, torch.add, operator.mul, torch.mul):
                return all(self.nonneg(a) for a in node.args[:2])
            if node.target is torch.cat:
                return all(self.nonneg(a) for a in node.args[0])
            return False
        if node.op == "call_method":
            if node.target in _NONNEG_METHODS:
                return True
            if node.target in _SIGN_KEEP_METHODS:
                return self.nonneg(first)
            return False
        return False

    def signed(self, node) -> bool | None:
        """``False`` if provably non-negative; ``None`` (decide on data) for graph
        inputs; ``True`` otherwise."""
        if self.nonneg(node):
            return False
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return None
        return True


def _target_bits(palette, target_bits, low_fraction) -> float | None:
    if target_bits is not None and low_fraction is not None:
        raise ValueError("give target_bits or low_fraction, not both")
    lo, hi = palette[0], palette[-1]
    if low_fraction is not None:
        if not 0.0 <= low_fraction <= 1.0:
            raise ValueError(f"low_fraction must be in [0, 1], not {low_fraction}")
        return low_fraction * lo + (1.0 - low_fraction) * hi
    if target_bits is not None and not lo <= target_bits <= hi:
        raise ValueError(f"target_bits {target_bits} is outside the palette range [{lo}, {hi}]")
    return None if target_bits is None else float(target_bits)


def prepare(model: nn.Module, palette=(2, 8), target_bits: float | None = None, *,
            low_fraction: float | None = None, weight_axis: str = "in", penalty: float = 1.0,
            matmul_bits: int | None = None, init_bits: float | None = None,
            act_scales: str = "group") -> fx.GraphModule:
    """A SONIQ QAT copy of ``model`` (the input is left untouched).

    ``palette``: the bit widths a channel may take (1..8), e.g. ``(2, 8)`` or ``(1, 4)``.
    ``target_bits``: budget on the average bits per weight element, or
    ``low_fraction``: the fraction of weights at the lowest level (one of the two; with
    neither, precisions are learned without a budget). ``weight_axis``: ``"in"`` ties a
    channel's weight precision to its input activation channel (SONIQ), ``"out"``
    gives weights per-output-channel precision. ``penalty``: strength of the budget
    term :func:`bit_penalty`. ``matmul_bits``: fixed width of activation-activation
    matmul operands (default: the palette's top). ``init_bits``: starting precision
    of every channel (default: the budget, else the palette midpoint).
    ``act_scales``: ``"group"`` learns one activation step per palette level of each
    quantized input (a channel's step follows its width; the export writes one step
    per channel, taking as many values as there are levels), ``"tensor"`` one step
    per tensor, ``"channel"`` one step per channel.

    BatchNorm2d layers are folded into the Conv2d before them using their running
    statistics, so prepare a trained (or at least BN-calibrated) float model.
    """
    palette = tuple(sorted(set(int(b) for b in palette)))
    if len(palette) < 2 or palette[0] < 1 or palette[-1] > 8:
        raise ValueError(f"palette must hold at least two bit widths in 1..8, not {palette}")
    target = _target_bits(palette, target_bits, low_fraction)
    if init_bits is None:
        init_bits = target if target is not None else (palette[0] + palette[-1]) / 2
    matmul_bits = palette[-1] if matmul_bits is None else int(matmul_bits)

    model = copy.deepcopy(model)
    _check_modules(model)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - tracing errors come in many types
        raise ExportError(f"torch.fx cannot trace the model: {e}", node=type(model).__name__,
                          hint="prepare needs a model without data-dependent control flow") from e
    graph = gm.graph

    # fold BatchNorm2d into the Conv2d before it
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        ok = (isinstance(src, fx.Node) and src.op == "call_module"
              and isinstance(gm.get_submodule(src.target), nn.Conv2d) and len(src.users) == 1)
        if not ok:
            raise ExportError("BatchNorm2d must directly follow a Conv2d (used only by it) to be folded",
                              node=str(node.target), hint="fold or remove it before prepare")
        _fold_bn(gm.get_submodule(src.target), gm.get_submodule(node.target))
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        gm.delete_submodule(node.target)

    signs = _Signs(gm)
    seen: set[str] = set()
    matmul_count = 0
    for node in list(graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if node.target in seen:
                    raise ExportError("a Conv2d/Linear called more than once is not supported",
                                      node=str(node.target), hint="use one module per call site")
                seen.add(node.target)
                cls = QConv2d if isinstance(mod, nn.Conv2d) else QLinear
                _set_module(gm, node.target, cls(mod, palette, weight_axis, init_bits,
                                                 signs.signed(node.args[0]), act_scales))
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            if node.op == "call_function" and fn in _WEIGHT_FUNCS:
                raise ExportError(f"functional {fn.__name__} is not supported", node=_owner(node),
                                  hint="use the nn.Module layer (nn.Linear, nn.Conv2d) instead")
            is_mm = (node.op == "call_function" and fn in _MATMULS) or \
                    (node.op == "call_method" and fn in ("matmul", "bmm", "__matmul__"))
            if not is_mm:
                continue
            a, b = node.args[0], node.args[1]
            for operand in (a, b):
                if isinstance(operand, fx.Node) and operand.op == "get_attr":
                    raise ExportError("matmul with a raw parameter is not supported", node=_owner(node),
                                      hint="use nn.Linear for weights")
            owner = _module_path(node)
            name = f"soniq_matmul{matmul_count}"
            path = f"{owner}.{name}" if owner else name
            matmul_count += 1
            gm.add_submodule(path, QMatMul(matmul_bits, signs.signed(a), signs.signed(b)))
            with graph.inserting_before(node):
                new = graph.call_module(path, (a, b))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    gm.soniq_config = QATConfig(palette=palette, target_bits=target, weight_axis=weight_axis,
                                penalty=float(penalty), matmul_bits=matmul_bits)
    gm.train(model.training)
    return gm


# ---- budget -------------------------------------------------------------------------
def quant_layers(qmodel: nn.Module) -> list[tuple[str, _QWeightLayer]]:
    """``(path, layer)`` of every QConv2d/QLinear, in module order."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, _QWeightLayer)]


def _weighted_bits(qmodel: nn.Module, hard: bool):
    num, den = 0.0, 0
    a_num, a_den = 0.0, 0
    for _, layer in quant_layers(qmodel):
        n = layer.weights_per_channel()
        b = layer.w_prec.current(hard)
        num = num + (b * n).sum()
        den += n * b.numel()
        if layer.a_prec is not None:
            ab = layer.a_prec.current(hard)
            a_num = a_num + ab.sum()
            a_den += ab.numel()
    if den == 0:
        raise ValueError("the model has no SONIQ layers; call prepare() first")
    return num / den, (a_num / a_den if a_den else None)


def average_bits(qmodel: nn.Module) -> float:
    """Average bits per weight element at the current integer bit widths (snapped,
    else each channel's nearest palette level)."""
    avg, _ = _weighted_bits(qmodel, hard=True)
    return float(avg)


def bit_penalty(qmodel: nn.Module) -> torch.Tensor:
    """Budget term to add to the task loss during phase 1:
    ``penalty * relu(avg_bits - target_bits)`` on the continuous precisions, averaged
    per weight element (plus the same on activation channels when
    ``weight_axis="out"``). Zero without a budget and after :func:`snap`."""
    cfg: QATConfig = qmodel.soniq_config
    layers = quant_layers(qmodel)
    if cfg.target_bits is None or all(layer.is_snapped for _, layer in layers):
        return torch.zeros(())
    avg, a_avg = _weighted_bits(qmodel, hard=False)
    term = torch.relu(avg - cfg.target_bits)
    if a_avg is not None:
        term = term + torch.relu(a_avg - cfg.target_bits)
    return cfg.penalty * term


def _fit_budget(entries, snapped: dict, count_of, palette, budget: float, promote: bool) -> None:
    """Move channels across palette levels so the weighted average of ``snapped``
    is at most ``budget`` (and, with ``promote``, as close to it as single steps up
    allow). Channels are taken in order of their continuous precision: the lowest
    go down first, the highest go up first."""
    total = sum(count_of(p) * p.channels for p in entries)
    if total == 0:
        return
    cur = sum(count_of(p) * float(snapped[id(p)].sum()) for p in entries)
    cands = [(float(b), id(p), c, count_of(p)) for p in entries
             for c, b in enumerate(p.continuous().detach().tolist())]
    limit = budget * total + 1e-6
    cands.sort(key=lambda t: t[0])
    while cur > limit:  # demote, lowest continuous precision first
        moved = False
        for _, pid, c, n in cands:
            i = palette.index(int(snapped[pid][c]))
            if i == 0:
                continue
            snapped[pid][c] = palette[i - 1]
            cur -= n * (palette[i] - palette[i - 1])
            moved = True
            if cur <= limit:
                break
        if not moved:
            break
    if not promote:
        return
    moved = True
    while moved:  # promote, highest continuous precision first, while the budget allows
        moved = False
        for _, pid, c, n in reversed(cands):
            i = palette.index(int(snapped[pid][c]))
            if i + 1 < len(palette) and cur + n * (palette[i + 1] - palette[i]) <= limit:
                snapped[pid][c] = palette[i + 1]
                cur += n * (palette[i + 1] - palette[i])
                moved = True


@torch.no_grad()
def snap(qmodel: nn.Module, *, budget: str = "fit", reinit_scales: bool = True) -> dict:
    """Phase 1 -> phase 2: fix every channel to one palette level.

    Each channel starts at the palette level nearest to its learned continuous
    precision. ``budget`` then says what happens when that misses ``target_bits``:

    * ``"fit"`` (default): the rounding threshold moves so that the average uses the
      budget without exceeding it: channels are demoted lowest-precision first while
      over budget, and promoted highest-precision first while a promotion still fits.
      The learned precisions thus decide *which* channels are low; the budget decides
      *how many*;
    * ``"cap"``: only demote (never exceed the budget);
    * ``"nearest"``: keep the nearest levels as they are.

    ``reinit_scales``: re-fit each weight row's scale to its snapped ranges
    (activation scales keep their learned values). Returns :func:`bit_report`.
    """
    if budget not in ("fit", "cap", "nearest"):
        raise ValueError(f"budget must be 'fit', 'cap' or 'nearest', not {budget!r}")
    cfg: QATConfig = qmodel.soniq_config
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("the model has no SONIQ layers; call prepare() first")
    if any(layer.is_snapped for _, layer in layers):
        raise ValueError("the model is already snapped")
    snapped = {id(p): p.nearest() for _, layer in layers for p in layer.precisions()}
    if budget != "nearest" and cfg.target_bits is not None:
        n_of = {id(layer.w_prec): layer.weights_per_channel() for _, layer in layers}
        _fit_budget([layer.w_prec for _, layer in layers], snapped, lambda p: n_of[id(p)],
                    cfg.palette, cfg.target_bits, budget == "fit")
        a_entries = [layer.a_prec for _, layer in layers if layer.a_prec is not None]
        if a_entries:
            _fit_budget(a_entries, snapped, lambda p: 1, cfg.palette, cfg.target_bits, budget == "fit")
    for _, layer in layers:
        for p in layer.precisions():
            p.snap(snapped[id(p)])
        if reinit_scales:
            layer.init_weight_scale()
    return bit_report(qmodel)


def bit_report(qmodel: nn.Module) -> dict:
    """Per-layer bits (integer, current) and the model totals, as plain data."""
    rows = {}
    total_w, total_bits = 0, 0
    for name, layer in quant_layers(qmodel):
        w_bits = [int(b) for b in layer.w_prec.nearest()]
        n = layer.weights_per_channel()
        rows[name] = {
            "kind": type(layer).__name__,
            "weight_axis": layer.weight_axis,
            "weights": layer.weight.numel(),
            "w_bits": w_bits,
            "a_bits": [int(b) for b in layer.act_precision.nearest()],
            "avg_bits": sum(w_bits) * n / layer.weight.numel(),
        }
        total_w += layer.weight.numel()
        total_bits += sum(w_bits) * n
    avg = total_bits / total_w if total_w else float("nan")
    return {"layers": rows, "weights": total_w, "avg_bits": avg,
            "compression": 32.0 / avg if total_w else float("nan")}
