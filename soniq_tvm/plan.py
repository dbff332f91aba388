"""The precision plan: what the compiler did with every conv/matmul, as data.

For each Conv / MatMul / Gemm of the file: its weight and activation bits per
channel, the channel groups the split produced (with the kernel family chosen
for each), bytes of weights before (int8) and after packing, and the run-time
gathers that could not be folded. A layer that runs in float has no groups and
says why (``reason``); an attention matmul of two activations is ``act-matmul``. Printable, JSON-serialisable, stored in every saved module and shown by
``soniq-tvm inspect``. Pure data: no TVM, no onnx.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

__all__ = ["GroupPlan", "LayerPlan", "Plan"]

VERSION = 1


@dataclass(frozen=True)
class GroupPlan:
    index: int
    w_bits: int
    a_bits: int
    in_channels: int
    out_channels: int
    family: str
    macs: int
    bytes_int8: int
    bytes_packed: int


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str
    w_axis: str
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    groups: tuple[GroupPlan, ...]
    gathers: int = 0
    reason: str = ""  # why the layer runs in float ("" for integer layers)
    scale_groups: int = 1  # activation step groups: one integer sum each, added in float

    @property
    def is_float(self) -> bool:
        return self.kind != "act-matmul" and not self.groups

    @property
    def bytes_before(self) -> int:
        return sum(g.bytes_int8 for g in self.groups)

    @property
    def bytes_after(self) -> int:
        return sum(g.bytes_packed for g in self.groups)

    @property
    def macs(self) -> int:
        return sum(g.macs for g in self.groups)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bytes_before=self.bytes_before, bytes_after=self.bytes_after)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(
            name=d["name"], kind=d["kind"], w_axis=d["w_axis"], w_bits=tuple(d["w_bits"]),
            a_bits=tuple(d["a_bits"]), groups=tuple(GroupPlan(**g) for g in d["groups"]),
            gathers=int(d.get("gathers", 0)), reason=str(d.get("reason", "")),
            scale_groups=int(d.get("scale_groups", 1)),
        )


@dataclass(frozen=True)
class Plan:
    layers: tuple[LayerPlan, ...] = ()
    target: str = ""
    version: int = VERSION
    notes: tuple[str, ...] = field(default=())
    bytes_stored: int = 0  # weights.bin of a saved module: the kernels' weights at their real widths

    # ---- derived -----------------------------------------------------------
    @property
    def bytes_before(self) -> int:
        return sum(l.bytes_before for l in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(l.bytes_after for l in self.layers)

    @property
    def gathers(self) -> int:
        return sum(l.gathers for l in self.layers)

    @property
    def float_layers(self) -> tuple[LayerPlan, ...]:
        """The convs/matmuls that run in float, each with its ``reason``."""
        return tuple(l for l in self.layers if l.is_float)

    @property
    def compression(self) -> float:
        """Weight compression vs. fp32 storage."""
        return 4.0 * self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    @property
    def stored_compression(self) -> float:
        """Compression of the saved weights (real widths) vs. fp32 storage."""
        return 4.0 * self.bytes_before / self.bytes_stored if self.bytes_stored else self.compression

    def layer(self, name: str) -> LayerPlan:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    # ---- serialisation -----------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": self.version, "target": self.target, "notes": list(self.notes),
            "layers": [l.to_dict() for l in self.layers],
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "gathers": self.gathers,
            "bytes_stored": self.bytes_stored,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version") != VERSION:
            raise ValueError(f"plan version {d.get('version')} is not {VERSION}")
        return cls(layers=tuple(LayerPlan.from_dict(l) for l in d["layers"]), target=d.get("target", ""),
                   notes=tuple(d.get("notes", ())), bytes_stored=int(d.get("bytes_stored", 0)))

    # ---- display -----------------------------------------------------------
    def __str__(self) -> str:
        def hist(bits):
            return " ".join(f"{b}b:{n}" for b, n in sorted(Counter(bits).items()))

        rows = [("layer", "op", "weight bits", "act bits", "groups (w x a: family)", "int8 B", "packed B",
                 "gathers")]
        for l in self.layers:
            groups = ", ".join(f"{g.w_bits}x{g.a_bits}[{g.in_channels}->{g.out_channels}]:{g.family}"
                               for g in l.groups)
            if l.kind == "act-matmul":
                groups = "activation x activation (integer)"
            elif l.is_float:
                groups = f"float: {l.reason}"
            elif l.scale_groups > 1:
                groups = f"{l.scale_groups} steps: {groups}"
            wbits = f"{hist(l.w_bits)} ({l.w_axis})" if l.w_bits else "-"
            rows.append((l.name, l.kind, wbits, hist(l.a_bits) or "-", groups,
                         str(l.bytes_before), str(l.bytes_after), str(l.gathers)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"target: {self.target}")
        lines.append(f"weights: {self.bytes_before} B int8 -> {self.bytes_after} B in memory (kernel layouts, "
                     f"{self.compression:.1f}x vs fp32)"
                     + (f", {self.bytes_stored} B stored at real widths ({self.stored_compression:.1f}x vs fp32)"
                        if self.bytes_stored else "") + f"; run-time gathers: {self.gathers}")
        if self.float_layers:
            lines.append(f"float: {len(self.float_layers)} of {len(self.layers)} conv/matmul layers")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)
