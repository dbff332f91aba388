"""Pictures of a model's precision. matplotlib is imported when a function is called
(``pip install soniq-tvm[plot]``), never by ``import soniq_tvm``."""
from __future__ import annotations

import numpy as np

__all__ = ["precision_grid", "precision_map"]


def precision_grid(model_or_path, kind: str = "weight") -> tuple[list[str], np.ndarray]:
    """``(names, grid)``: one row per annotated ``kind`` tensor (``"weight"`` or
    ``"activation"``) in graph order, named by its DequantizeLinear node, holding the
    width of each channel along its annotated axis (NaN past its last channel). A
    tensor of one width for all its channels has one entry."""
    from .annotation import read_annotations
    from .errors import InputError

    if kind not in ("weight", "activation"):
        raise InputError(f"kind={kind!r} is not 'weight' or 'activation'")
    anns = [a for a in read_annotations(model_or_path).values() if a.kind == kind]
    width = max((len(a.bits) for a in anns), default=0)
    grid = np.full((len(anns), width), np.nan)
    for i, a in enumerate(anns):
        grid[i, : len(a.bits)] = a.bits
    return [a.node for a in anns], grid


def precision_map(model_or_path, kind: str = "weight", ax=None, title: str | None = None):
    """Channels x layers map of per-channel bit widths, one colour per width present
    (a row per annotated tensor, channels along x). Draws on ``ax`` (a new figure
    when None) and returns the figure."""
    names, grid = precision_grid(model_or_path, kind)
    try:
        import matplotlib.pyplot as plt
        from matplotlib.colors import BoundaryNorm, ListedColormap
    except ImportError:  # pragma: no cover - depends on the installation
        from .errors import SoniqError

        raise SoniqError("precision_map needs matplotlib", hint="pip install 'soniq-tvm[plot]'") from None
    widths = sorted({int(b) for b in grid[~np.isnan(grid)]}) or [8]
    colours = plt.get_cmap("viridis", max(2, len(widths)))(np.arange(len(widths)))
    cmap = ListedColormap(colours)
    cmap.set_bad("white")
    edges = [widths[0] - 0.5] + [(a + b) / 2 for a, b in zip(widths, widths[1:])] + [widths[-1] + 0.5]
    norm = BoundaryNorm(edges, cmap.N)
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    else:
        fig = ax.figure
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.set_xlabel(f"{kind} channel (along its annotated axis)")
    ax.set_title(title or f"per-channel {kind} widths")
    bar = fig.colorbar(image, ax=ax, ticks=widths)
    bar.set_label("bits")
    return fig
