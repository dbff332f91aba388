"""Bar chart of a benchmark run: latency of every peer and soniq variant as a
multiple of ONNX Runtime INT8 on the same model (log scale, from the same run):
the paired ratio (interleaved rounds) where the run has one, else the ratio of
medians (marked ``*``).

    python -m benchmarks.plot [benchmarks/results.json] [-o benchmarks/results.png]

Needs matplotlib (``pip install -e ".[plot]"``); the rows come from the JSON that
``python -m benchmarks.run --out`` writes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ratios(rows: list[dict]) -> dict[str, list[tuple[str, float]]]:
    """model -> [(variant, x ORT INT8)] for the rows that were timed: the paired
    ratio, or the ratio of medians with ``*`` after the variant's name."""
    out: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        if not r.get("timing"):
            continue
        if r.get("paired_ort_int8") is not None:
            out.setdefault(r["model"], []).append((r["variant"], float(r["paired_ort_int8"])))
        elif r.get("ratio_ort_int8") is not None:
            out.setdefault(r["model"], []).append((r["variant"] + " *", float(r["ratio_ort_int8"])))
    return out


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = ratios(results["rows"])
    if not data:
        raise SystemExit("no timed rows with an ORT INT8 ratio in the results")
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4.5), squeeze=False)
    for ax, (model, items) in zip(axes[0], data.items()):
        names = [v for v, _ in items]
        vals = [x for _, x in items]
        colors = ["tab:green" if v.startswith("soniq") else "tab:gray" for v in names]
        ax.barh(range(len(vals)), vals, color=colors)
        ax.set_yticks(range(len(vals)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        for i, x in enumerate(vals):
            ax.text(x, i, f" {x:.2f}x", va="center", fontsize=7)
        ax.set_title(model)
        ax.set_xlabel("latency / ORT INT8 (lower is faster)")
    machine = results.get("machine", {})
    fig.suptitle(f"batch 1, 2 threads; paired ratios (* ratio of medians); {machine.get('cpu_model', '')} "
                 f"{machine.get('date', '')}".strip(), fontsize=9)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)  # atomic: a half-written picture never replaces a good one
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=str(HERE / "results.json"))
    ap.add_argument("-o", "--out", default=str(HERE / "results.png"))
    a = ap.parse_args(argv)
    print(plot(json.loads(Path(a.results).read_text()), Path(a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
