"""One row per (model, variant), and the side-by-side table printed by ``run``.

Ratios are latency ratios, ``variant median / peer median``: below 1 the
variant is faster than the peer, above 1 slower. ``x ORT INT8 paired`` is the
same ratio against ORT INT8 taken from interleaved rounds
(:func:`benchmarks.timing.paired_ratio`), which a drifting machine does not skew. A row that could not run
carries ``timing=None`` and a ``note`` saying why; it prints as ``n/a``.
"""
from __future__ import annotations

import dataclasses
import re

from .peers import Agreement
from .timing import Timing

ORT_INT8 = "ORT INT8 QDQ"
ORT_FP32 = "ORT fp32"
NOTE_WIDTH = 120


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    timing: Timing | None = None
    agreement: Agreement | None = None
    build_s: float | None = None
    note: str = ""
    ratio_ort_int8: float | None = None
    ratio_ort_fp32: float | None = None
    paired_ort_int8: float | None = None
    paired_spread: tuple[float, float] | None = None  # p10, p90 of the per-round ratios
    fn: object = dataclasses.field(default=None, repr=False, compare=False)  # one timed call; not saved

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "fn"}
        d["paired_spread"] = list(self.paired_spread) if self.paired_spread else None  # as JSON reads it back
        d["timing"] = self.timing.to_dict() if self.timing else None
        d["agreement"] = self.agreement.to_dict() if self.agreement else None
        return d


def failure(exc: BaseException, limit: int = 300) -> str:
    """An exception as an ``n/a`` row's reason: its first line, and its last
    wordy line when the message runs on (TVM puts the diagnosis last)."""
    message = re.sub(r"'/[^']*/([^'/]+)'", r"'\1'", f"{type(exc).__name__}: {exc}")  # paths: basename
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    wordy = [ln for ln in lines[1:] if sum(c.isalpha() for c in ln) >= 8]
    text = lines[0] if not wordy else f"{lines[0]} ... {wordy[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fill_ratios(rows: list[Row]) -> None:
    """Set each row's latency ratios against the ORT INT8 and ORT fp32 rows of its model."""
    medians = {(r.model, r.variant): r.timing.median_ms for r in rows if r.timing}
    for r in rows:
        if r.timing is None:
            continue
        for attr, peer in (("ratio_ort_int8", ORT_INT8), ("ratio_ort_fp32", ORT_FP32)):
            base = medians.get((r.model, peer))
            setattr(r, attr, r.timing.median_ms / base if base else None)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    header = (
        "model", "variant", "median ms", "p10 ms", "p90 ms", "runs",
        "x ORT INT8", "paired", "x ORT fp32", "agreement (vs reference)", "note",
    )
    lines = []
    for r in rows:
        t = r.timing
        note = r.note if len(r.note) <= NOTE_WIDTH else r.note[: NOTE_WIDTH - 3] + "..."
        lines.append((
            r.model,
            r.variant,
            _fmt(t and t.median_ms, ".3f"),
            _fmt(t and t.p10_ms, ".3f"),
            _fmt(t and t.p90_ms, ".3f"),
            _fmt(t and t.runs, "d"),
            _fmt(r.ratio_ort_int8, ".2f"),
            _fmt(r.paired_ort_int8, ".2f"),
            _fmt(r.ratio_ort_fp32, ".2f"),
            str(r.agreement) if r.agreement else "",
            note,
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt_line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt_line(header), fmt_line(["-" * w for w in widths])]
    out += [fmt_line(line) for line in lines]
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def format_markdown(rows: list[Row]) -> str:
    """The same table as GitHub markdown (for RESULTS.md)."""
    head = ("| model | variant | median ms | p10–p90 ms | runs | x ORT INT8 | x ORT INT8 paired (p10–p90) "
            "| x ORT fp32 | agreement | note |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        t = r.timing
        spread = f"{t.p10_ms:.3f}–{t.p90_ms:.3f}" if t else "n/a"
        paired = _fmt(r.paired_ort_int8, ".2f")
        if r.paired_spread and r.variant != ORT_INT8:
            paired += f" ({r.paired_spread[0]:.2f}–{r.paired_spread[1]:.2f})"
        out.append(
            f"| {r.model} | {r.variant} | {_fmt(t and t.median_ms, '.3f')} | {spread} | "
            f"{_fmt(t and t.runs, 'd')} | {_fmt(r.ratio_ort_int8, '.2f')} | {paired} | "
            f"{_fmt(r.ratio_ort_fp32, '.2f')} | {_md(str(r.agreement or ''))} | {_md(r.note)} |"
        )
    return "\n".join(out)


def fill_paired(rows: list[Row], rounds: int, per_round: int, log=None, max_seconds: float = 30.0) -> None:
    """Set ``paired_ort_int8`` of every timed row of one model that kept its call
    (``fn``), against that model's ORT INT8 row; a row whose paired rounds would
    take over ``max_seconds`` (untuned TVM: seconds a call) is left out. The cut is
    on wall time, not on the ratio: a tiny model's ORT call takes microseconds, so
    a peer with a fixed per-call overhead (PyTorch) can be 50x slower and still
    cheap to pair. ``rounds`` 0: nothing."""
    from .timing import paired_ratio

    ref = next((r for r in rows if r.variant == ORT_INT8 and r.fn is not None and r.timing), None)
    if ref is None or rounds < 1:
        return
    ref.paired_ort_int8 = 1.0
    for r in rows:
        if r is ref or r.fn is None or r.timing is None or (
            r.timing.median_ms + ref.timing.median_ms
        ) * 1e-3 * rounds * per_round > max_seconds:
            continue
        med, p10, p90 = paired_ratio(r.fn, ref.fn, rounds, per_round)
        r.paired_ort_int8, r.paired_spread = med, (p10, p90)
        if log:
            log(f"[{r.model}] {r.variant}: {med:.2f}x ORT INT8 paired (p10 {p10:.2f}, p90 {p90:.2f})")
