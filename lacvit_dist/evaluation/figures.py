"""Evaluation figures drawn with matplotlib: what a researcher looks at to decide what to run next.

* :func:`confusion_figure` -- confusion matrix normalised per true class; counts and names on small
  matrices, the most-confused class pairs (:func:`most_confused`) listed beside large ones.
* :func:`per_class_figure` -- per-class accuracy sorted, the worst classes named.
* :func:`embedding_figure` -- PCA scatter of embeddings coloured by class, axes labelled with the share of
  variance each component explains (:func:`pca`).
* :func:`health_figure` -- stage-1 embedding health (kNN, isotropy, effective rank, ...) over training.
* :func:`seed_bars_figure`, :func:`table_figure` -- ``tools/reproduce_small.py``'s Top-1 bars with every
  seed's point, and its embedding-health table.

Every builder returns a ``matplotlib.figure.Figure`` made without pyplot (no global state, no display):
hand it to ``SummaryWriter.add_figure`` or :func:`save_figure`. Inputs may be torch tensors or numpy
arrays and are never modified.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

os.environ.setdefault("MPLBACKEND", "Agg")  # no display on cluster nodes; a user's own choice wins

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lacvit_dist.io import atomic_path

__all__ = ["confusion_figure", "most_confused", "per_class_figure", "pca", "embedding_figure",
           "health_figure", "seed_bars_figure", "table_figure", "reproduce_figure", "save_figure",
           "MAX_NAMED_CLASSES", "MAX_COUNTED_CLASSES", "MAX_LEGEND_CLASSES", "MAX_BAR_NAMES", "WORST_SHOWN"]

MAX_NAMED_CLASSES = 30  # confusion matrix: class names on the axes up to this many classes
MAX_COUNTED_CLASSES = 15  # confusion matrix: counts written in the cells up to this many classes
MAX_LEGEND_CLASSES = 20  # scatter: a legend up to this many classes
MAX_BAR_NAMES = 40  # per-class accuracy: every class named up to this many, else the worst WORST_SHOWN
WORST_SHOWN = 20  # classes named in the "worst classes" panel, pairs listed in the "most confused" one
NAME_CHARS = 24  # class names are cut to this many characters


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _short(name: Any, limit: int = NAME_CHARS) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    return [_short(n) for n in class_names]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # an Agg canvas of its own: renders without pyplot or a display
    return fig


def _class_colours(num_classes: int) -> np.ndarray:
    """tab10/tab20 up to 20 classes; beyond, evenly spaced hues of a cyclic map (neighbours differ)."""
    if num_classes <= 10:
        return colormaps["tab10"](np.arange(num_classes))
    if num_classes <= 20:
        return colormaps["tab20"](np.arange(num_classes))
    order = (np.arange(num_classes) * 0.618033988749895) % 1.0  # golden-ratio steps: close indices, far hues
    return colormaps["hsv"](order * 0.9)


# -------------------------------------------------------------------------------------- confusion matrix
def _row_normalised(m: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the fraction of true class t predicted as p); NaN for empty rows."""
    rows = m.sum(axis=1, keepdims=True)
    return np.divide(m, rows, out=np.full_like(m, np.nan, dtype=np.float64), where=rows > 0)


def most_confused(confusion: Any, class_names: Sequence[str] | None = None,
                  top: int = WORST_SHOWN) -> list[tuple[str, str, float, int]]:
    """The ``top`` largest off-diagonal cells of a confusion matrix (rows = true class), as
    ``(true name, predicted name, rate, count)`` with ``rate = M[t, p] / sum_p M[t, p]``; highest rate
    first (ties: the larger count, then the lower indices). Cells with no sample are left out."""
    m = _to_numpy(confusion).astype(np.float64)
    names = _names(class_names, m.shape[0])
    rate = np.nan_to_num(_row_normalised(m))
    np.fill_diagonal(rate, 0.0)
    t, p = np.nonzero(rate > 0)  # the diagonal is zeroed above
    order = np.lexsort((p, t, -m[t, p], -rate[t, p]))[:top]
    return [(names[t[i]], names[p[i]], float(rate[t[i], p[i]]), int(m[t[i], p[i]])) for i in order]


def confusion_figure(confusion: Any, class_names: Sequence[str] | None = None, *,
                     title: str = "confusion matrix") -> Figure:
    """Heat map of a ``[C, C]`` confusion matrix (rows = true class, columns = predicted).

    A cell's colour is ``M[t, p] / sum_p M[t, p]`` (0 to 1; the diagonal is each class's recall); a true
    class without samples is blank. Up to ``MAX_COUNTED_CLASSES`` classes the raw counts are written in the
    cells, up to ``MAX_NAMED_CLASSES`` the class names label the axes; beyond, the axes carry class indices
    only and a panel beside the matrix lists the ``WORST_SHOWN`` most-confused pairs with their rates.
    """
    m = _to_numpy(confusion).astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"confusion must be a non-empty square [C, C] matrix, got shape {m.shape}")
    c = m.shape[0]
    names = _names(class_names, c)
    named = c <= MAX_NAMED_CLASSES
    side = min(12.0, max(5.0, 0.35 * c + 2.5)) if named else 8.0
    fig = _figure(side + (1.0 if named else 5.0), side)
    if not named:  # too many names to read: list the pairs that matter instead
        grid = fig.add_gridspec(1, 2, width_ratios=[side, 5.0])
        ax, panel = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    else:
        ax, panel = fig.add_subplot(), None
    image = ax.imshow(_row_normalised(m), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xlabel("predicted class" if named else "predicted class (index)")
    ax.set_ylabel("true class" if named else "true class (index)")
    ax.set_title(f"{title} ({c} classes, {int(m.sum())} samples)")
    if named:
        ax.set_xticks(range(c), names, rotation=90 if max(map(len, names)) > 3 else 0)
        ax.set_yticks(range(c), names)
    if c <= MAX_COUNTED_CLASSES:
        frac = np.nan_to_num(_row_normalised(m))
        for t in range(c):
            for p in range(c):
                ax.text(p, t, str(int(m[t, p])), ha="center", va="center", fontsize=9,
                        color="black" if frac[t, p] > 0.6 else "white")
    if panel is not None:
        _confused_panel(panel, most_confused(m, class_names))
    return fig


def _confused_panel(ax: Axes, pairs: list[tuple[str, str, float, int]]) -> None:
    ax.axis("off")
    ax.set_title("most confused (true → predicted)", loc="left")
    lines = [f"{rate:6.1%}  ({count})  {true} → {pred}" for true, pred, rate, count in pairs] or ["none"]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8,
            transform=ax.transAxes)


# ------------------------------------------------------------------------------------ per-class accuracy
def per_class_figure(accuracy: Any, class_names: Sequence[str] | None = None, *, support: Any = None,
                     title: str = "per-class accuracy") -> Figure:
    """Per-class accuracy, sorted from the worst class, with the mean over the classes present.

    Classes with ``support == 0`` (when ``support`` is given, as from
    :func:`lacvit_dist.evaluation.metrics.per_class_accuracy`) or a NaN accuracy are left out and counted in the title.
    Up to ``MAX_BAR_NAMES`` classes: one named bar each. Beyond: all classes as a sorted profile, and the
    ``WORST_SHOWN`` worst named with their accuracy in a second panel.
    """
    a = _to_numpy(accuracy).astype(np.float64).reshape(-1)
    c = a.shape[0]
    if c == 0:
        raise ValueError("per-class accuracy is empty")
    present = ~np.isnan(a)
    if support is not None:
        s = _to_numpy(support).reshape(-1)
        if s.shape[0] != c:
            raise ValueError(f"support has {s.shape[0]} entries for {c} classes")
        present &= s > 0
    names = _names(class_names, c)
    idx = np.flatnonzero(present)
    idx = idx[np.argsort(a[idx], kind="stable")]  # worst first; ties keep class order
    absent = c - idx.size
    heading = f"{title} ({idx.size} classes" + (f"; {absent} without samples left out)" if absent else ")")
    mean = float(a[idx].mean()) if idx.size else float("nan")
    if c <= MAX_BAR_NAMES:
        fig = _figure(7.0, max(2.5, 0.28 * idx.size + 1.5))
        _named_bars(fig.add_subplot(), idx, a, names, mean)
        fig.suptitle(heading)
        return fig
    fig = _figure(12.0, max(5.0, 0.28 * WORST_SHOWN + 1.5))
    grid = fig.add_gridspec(1, 2, width_ratios=[1.2, 1.0])
    profile = fig.add_subplot(grid[0, 0])
    profile.bar(np.arange(idx.size), a[idx], width=1.0, color="tab:blue")
    profile.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.3f}")
    profile.set(xlim=(-0.5, max(idx.size, 1) - 0.5), ylim=(0, 1), xlabel="classes, sorted by accuracy",
                ylabel="accuracy", title="all classes")
    profile.legend(loc="upper left")
    _named_bars(fig.add_subplot(grid[0, 1]), idx[:WORST_SHOWN], a, names, mean, title=f"worst {WORST_SHOWN}")
    fig.suptitle(heading)
    return fig


def _named_bars(ax: Axes, idx: np.ndarray, a: np.ndarray, names: list[str], mean: float,
                title: str | None = None) -> None:
    """Horizontal bars, the first index at the top, each with its name and value."""
    y = np.arange(idx.size)
    ax.barh(y, a[idx], color="tab:blue")
    ax.set_yticks(y, [names[k] for k in idx])
    ax.invert_yaxis()
    for row, k in zip(y, idx):
        ax.text(min(a[k], 1.0) + 0.01, row, f"{a[k]:.3f}", va="center", fontsize=8)
    if not np.isnan(mean):
        ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.3f}")
        ax.legend(loc="upper right")  # worst first: the short bars leave this corner free
    ax.set(xlim=(0, 1.12), xlabel="accuracy")
    if title:
        ax.set_title(title)


# ------------------------------------------------------------------------------------------- embeddings
def pca(x: Any, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` [N, D] projected on their first ``k`` principal components (fp64 SVD of the centred
    rows), and the fraction of the total variance each component explains. Component signs are fixed (the
    largest-magnitude loading is positive) so the same data always gives the same picture."""
    x = _to_numpy(x).astype(np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs an [N, D] matrix with N >= 2, got shape {x.shape}")
    centred = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:k] * np.sign(vt[:k][np.arange(min(k, vt.shape[0])), np.abs(vt[:k]).argmax(axis=1)])[:, None]
    total = float((s ** 2).sum())
    ratios = (s[:k] ** 2) / total if total > 0 else np.zeros(min(k, s.size))
    return centred @ vt.T, ratios


def _draw_scatter(ax: Axes, x: Any, labels: Any, names: Sequence[str] | None, title: str) -> None:
    points, ratios = pca(x)
    lab = _to_numpy(labels).astype(np.int64).reshape(-1)
    if lab.shape[0] != points.shape[0]:
        raise ValueError(f"{lab.shape[0]} labels for {points.shape[0]} embeddings")
    c = len(names) if names is not None else int(lab.max()) + 1
    if lab.size and (lab.min() < 0 or lab.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got {lab.min()}..{lab.max()}")
    colours = _class_colours(c)
    order = np.random.default_rng(0).permutation(points.shape[0])  # no class always drawn on top
    ax.scatter(points[order, 0], points[order, 1] if points.shape[1] > 1 else np.zeros(len(order)),
               c=colours[lab[order]], s=8 if len(order) > 2000 else 14, linewidths=0)
    if c <= MAX_LEGEND_CLASSES:
        shown = _names(names, c) if names is not None else [str(k) for k in range(c)]
        for k in range(c):
            ax.scatter([], [], color=colours[k], label=shown[k], s=14)
        ax.legend(fontsize=7, markerscale=1.2, loc="best", ncols=2 if c > 10 else 1)
    ax.set_xlabel(f"PC1 ({ratios[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({ratios[1]:.1%} of variance)" if ratios.size > 1 else "PC2")
    ax.set_title(title)


def embedding_figure(x: Any, labels: Any, class_names: Sequence[str] | None = None, *,
                     title: str = "embeddings (PCA)") -> Figure:
    """The rows of ``x`` [N, D] on their first two principal components, coloured by ``labels`` [N] (ints in
    ``[0, C)``); the axis labels give the share of the variance each component explains. A legend names
    the classes up to ``MAX_LEGEND_CLASSES``."""
    fig = _figure(7.0, 6.0)
    _draw_scatter(fig.add_subplot(), x, labels, class_names, title)
    return fig


HEALTH_CURVES = {"knn_top1": "kNN Top-1", "isotropy": "isotropy (1 = isotropic)",
                 "effective_rank": "effective rank", "alignment": "alignment (lower: closer positives)",
                 "uniformity": "uniformity (lower: more uniform)"}


def health_figure(history: Sequence[Mapping[str, float]], *, title: str = "stage-1 embedding health") -> Figure:
    """Stage-1 monitor values over training: one panel per quantity, one line per embedding.

    ``history`` rows are evaluations in step order, each with ``step`` and the keys of
    :func:`lacvit_dist.evaluation.evaluate_embeddings` (``knn_top1``, ``backbone/isotropy``,
    ``projection/isotropy``, ...). Quantities absent from every row are not drawn."""
    if not history:
        raise ValueError("health_figure needs at least one evaluation")
    steps = [row["step"] for row in history]
    panels = [(key, label) for key, label in HEALTH_CURVES.items()
              if any(k == key or k.endswith("/" + key) for row in history for k in row)]
    fig = _figure(3.2 * len(panels), 3.6)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        series = sorted({k for row in history for k in row if k == key or k.endswith("/" + key)})
        for name in series:
            values = [row.get(name, np.nan) for row in history]
            ax.plot(steps, values, marker="o", markersize=3, label=name.split("/")[0] if "/" in name else None)
        ax.set(title=label, xlabel="step")
        if any("/" in name for name in series):
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------- reproduce_small
def _draw_seed_bars(ax: Axes, names: Sequence[str], per_seed: Sequence[Sequence[float]], title: str) -> None:
    if not names or len(names) != len(per_seed) or any(len(v) == 0 for v in per_seed):
        raise ValueError(f"need a non-empty list of values per name, got {len(names)} names and "
                         f"{[len(v) for v in per_seed]} values")
    means = [float(np.mean(v)) for v in per_seed]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in per_seed]
    x = np.arange(len(names))
    ax.bar(x, means, yerr=stds, capsize=6, color=_class_colours(len(names)), alpha=0.75)
    for i, values in enumerate(per_seed):
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + jitter, values, color="black", s=18, zorder=3, label="one seed" if i == 0 else None)
        ax.text(i, min(1.0, means[i] + stds[i]) + 0.02, f"{means[i]:.3f} ± {stds[i]:.3f}", ha="center",
                fontsize=9)
    ax.set_xticks(x, [_short(n, 30) for n in names])
    ax.set(ylim=(0, 1.1), ylabel="Top-1", title=title)
    ax.legend(loc="upper left")


def seed_bars_figure(names: Sequence[str], per_seed: Sequence[Sequence[float]], *,
                     title: str = "test Top-1 (mean ± std over seeds)") -> Figure:
    """One bar per method at its mean over seeds, a ±1 sample-std whisker, and every seed's own value as a
    point."""
    fig = _figure(1.8 * len(names) + 2.5, 4.5)
    _draw_seed_bars(fig.add_subplot(), names, per_seed, title)
    return fig


def _draw_table(ax: Axes, rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], title: str) -> None:
    ax.axis("off")
    cells = [[f"{rows[r][col]:.4g}" for col in columns] for r in rows]
    table = ax.table(cellText=cells, rowLabels=list(rows), colLabels=list(columns), loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.4)
    ax.set_title(title)


def table_figure(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], *, title: str = "") -> Figure:
    """A table of numbers: one row per key of ``rows``, one column per entry of ``columns``."""
    fig = _figure(1.4 * len(columns) + 3.0, 0.4 * len(rows) + 1.5)
    _draw_table(fig.add_subplot(), rows, columns, title)
    return fig


def reproduce_figure(methods: Sequence[tuple[str, Sequence[float]]], health: Mapping[str, Mapping[str, float]],
                     health_columns: Sequence[str], scatters: Sequence[tuple[str, Any, Any]],
                     class_names: Sequence[str]) -> Figure:
    """``tools/reproduce_small.py``'s summary: Top-1 bars with each seed's point and the embedding-health
    table on top, the PCA of each backbone's test embeddings (``(title, embeddings, labels)``) below."""
    fig = _figure(5.0 * max(3, len(scatters)), 10.0)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.1])
    upper = top.subplots(1, 2, width_ratios=[1.0, 2.0])
    _draw_seed_bars(upper[0], [m for m, _ in methods], [v for _, v in methods], "target test Top-1 (mean ± std)")
    _draw_table(upper[1], health, health_columns, "backbone embeddings of the target test split")
    for ax, (title, x, labels) in zip(np.atleast_1d(bottom.subplots(1, len(scatters))), scatters):
        _draw_scatter(ax, x, labels, class_names, title)
    return fig


# ---------------------------------------------------------------------------------------------- files
def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG, atomically: a temporary file in the destination folder (created if missing)
    moved over ``path``, so a reader never sees half a PNG and a failure leaves an earlier file intact."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
