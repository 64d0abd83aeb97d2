"""Evaluation figures drawn with PIL only (no matplotlib): confusion matrix, per-class accuracy, 2-D scatter,
mean +- std bars, and a row of figures.

Every figure is returned as a ``numpy.ndarray`` of shape ``[H, W, 3]``, dtype ``uint8`` (RGB), ready for
``SummaryWriter.add_image(tag, array, step, dataformats="HWC")`` or for :func:`save_png`. Text uses PIL's
default font (``ImageFont.load_default()``); long class names are shortened to fit. The functions accept
torch tensors or numpy arrays and never modify them; drawing is deterministic (same input, same pixels).
"""
from __future__ import annotations

import colorsys
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["confusion_matrix_image", "per_class_bar_image", "scatter_image", "mean_std_bar_image", "side_by_side",
           "save_png", "class_colors",
           "MAX_LABELLED_CLASSES", "MAX_COUNTED_CLASSES", "MAX_LEGEND_CLASSES", "MAX_BAR_LABELS"]

MAX_LABELLED_CLASSES = 30  # confusion matrix: class names on the axes up to this many classes
MAX_COUNTED_CLASSES = 20  # confusion matrix: counts written in the cells up to this many classes
MAX_LEGEND_CLASSES = 20  # scatter: legend up to this many classes
MAX_BAR_LABELS = 100  # per-class bars: one labelled row per class up to this many classes

WHITE, BLACK, GREY, LIGHT_GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128), (225, 225, 225)
NAME_CHARS = 18  # class names are cut to this many characters

# Anchor colours of matplotlib's "viridis" (perceptually uniform, colour-blind safe), interpolated linearly.
_VIRIDIS = np.array([(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
                     (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)],
                    dtype=np.float64)
# matplotlib's "tab20" order: tab10 first, then the light variants.
_TAB20 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
          "#dbdb8d", "#9edae5"]


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _text_size(text: str) -> tuple[int, int]:
    left, top, right, bottom = _font().getbbox(text)
    return right - left, bottom - top


def _line_height() -> int:
    return _text_size("Ag0|")[1] + 2


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill=BLACK,
          anchor: str = "la") -> None:
    draw.text(xy, text, fill=fill, font=_font(), anchor=anchor)


def _short(name: str, limit: int = NAME_CHARS) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "~"


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    return [_short(n) for n in class_names]


def _viridis(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN -> 0) to uint8 RGB, shape values.shape + (3,)."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    return np.rint(_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).astype(np.uint8)


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """One RGB colour per class: matplotlib's tab20 for up to 20 classes, golden-ratio hues beyond."""
    if num_classes <= len(_TAB20):
        return [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in _TAB20[:num_classes]]
    colours = []
    for c in range(num_classes):
        hue = (c * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75 if c % 2 else 0.95, 0.85 if c % 3 else 0.65)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def _rotated_text(text: str, fill=BLACK) -> Image.Image:
    """`text` rotated 90 degrees counter-clockwise (reads bottom to top), as an RGBA image."""
    w, h = _text_size(text)
    img = Image.new("RGBA", (w + 2, _line_height()), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((1, 0), text, fill=fill + (255,), font=_font())
    return img.rotate(90, expand=True)


def _finish(img: Image.Image) -> np.ndarray:
    out = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(out)


def _title_band(width: int, title: str | None) -> tuple[Image.Image | None, int]:
    if not title:
        return None, 0
    h = _line_height() + 6
    band = Image.new("RGB", (width, h), WHITE)
    _text(ImageDraw.Draw(band), (width / 2, h / 2), _short(title, 120), anchor="mm")
    return band, h


def _with_title(img: Image.Image, title: str | None) -> Image.Image:
    band, h = _title_band(img.width, title)
    if band is None:
        return img
    out = Image.new("RGB", (img.width, img.height + h), WHITE)
    out.paste(band, (0, 0))
    out.paste(img, (0, h))
    return out


# --------------------------------------------------------------------------------------------------------
def confusion_matrix_image(confusion: Any, class_names: Sequence[str] | None = None, *,
                           title: str | None = None) -> np.ndarray:
    """Heat map of a ``[C, C]`` confusion matrix (rows = true class, columns = predicted).

    Each cell's colour is its ROW-normalised value ``M[t, p] / sum_p M[t, p]`` (the fraction of class ``t``
    predicted as ``p``; the diagonal is the per-class recall) on the viridis scale, 0 to 1, with a colour
    bar; a row without samples is drawn light grey. Class names label both axes when
    ``C <= MAX_LABELLED_CLASSES`` (30), the raw counts are written in the cells when
    ``C <= MAX_COUNTED_CLASSES`` (20). Cells shrink with ``C`` (down to one pixel), so the image stays
    below about 1,000 pixels a side up to ~900 classes. Returns ``[H, W, 3]`` uint8.
    """
    m = _to_numpy(confusion).astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"confusion must be a non-empty square [C, C] matrix, got shape {m.shape}")
    c = m.shape[0]
    names = _names(class_names, c)
    labelled, counted = c <= MAX_LABELLED_CLASSES, c <= MAX_COUNTED_CLASSES
    row_sum = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, row_sum, out=np.zeros_like(m), where=row_sum > 0)

    line = _line_height()
    if counted:
        widest = max(_text_size(str(int(v)))[0] for v in m.reshape(-1))
        cell = max(widest + 6, line + 6, min(48, 640 // c))
    elif labelled:
        cell = max(line + 2, min(32, 768 // c))
    else:
        cell = max(1, min(24, 900 // c))
    name_w = max(_text_size(n)[0] for n in names) + 6 if labelled else 0
    left = name_w + line + 6  # axis title "true" + class names
    top = name_w + line + 6  # axis title "predicted" + rotated class names
    grid = c * cell
    bar_w, bar_gap = 14, 12
    tick_w = _text_size("1.0")[0] + 6
    width = left + grid + bar_gap + bar_w + tick_w + 6
    height = top + grid + 8
    img = Image.new("RGB", (width, max(height, top + 60)), WHITE)
    draw = ImageDraw.Draw(img)

    colours = _viridis(frac)
    colours[(row_sum[:, 0] == 0)] = LIGHT_GREY
    heat = Image.fromarray(colours, "RGB").resize((grid, grid), Image.NEAREST)
    img.paste(heat, (left, top))
    if cell >= 6:  # thin separators keep neighbouring cells apart
        for k in range(c + 1):
            draw.line([(left + k * cell, top), (left + k * cell, top + grid)], fill=WHITE)
            draw.line([(left, top + k * cell), (left + grid, top + k * cell)], fill=WHITE)
    if counted:
        for t in range(c):
            for p in range(c):
                r, g, b = (int(v) for v in colours[t, p])
                ink = BLACK if 0.299 * r + 0.587 * g + 0.114 * b > 140 else WHITE
                _text(draw, (left + p * cell + cell / 2, top + t * cell + cell / 2), str(int(m[t, p])),
                      fill=ink, anchor="mm")
    if labelled:
        for k, name in enumerate(names):
            _text(draw, (left - 4, top + k * cell + cell / 2), name, anchor="rm")
            rot = _rotated_text(name)
            img.paste(rot, (left + k * cell + (cell - rot.width) // 2, top - 4 - rot.height), rot)
    _text(draw, (left + grid / 2, 2), "predicted", anchor="ma")
    rot = _rotated_text("true")
    img.paste(rot, (2, top + (grid - rot.height) // 2), rot)

    # Colour bar, 0 at the bottom, 1 at the top.
    bx, bh = left + grid + bar_gap, max(grid, 40)
    ramp = _viridis(np.linspace(1.0, 0.0, bh))[:, None, :].repeat(bar_w, axis=1)
    img.paste(Image.fromarray(np.ascontiguousarray(ramp), "RGB"), (bx, top))
    draw.rectangle([bx, top, bx + bar_w - 1, top + bh - 1], outline=GREY)
    _text(draw, (bx + bar_w + 3, top), "1.0", anchor="la")
    _text(draw, (bx + bar_w + 3, top + bh), "0.0", anchor="ld")
    return _finish(_with_title(img, title))


def per_class_bar_image(acc: Any, class_names: Sequence[str] | None = None, *, support: Any = None,
                        title: str | None = None) -> np.ndarray:
    """Horizontal bar per class: accuracy in ``[0, 1]`` (values outside are clipped for drawing).

    Classes with ``support == 0`` (when ``support`` is given, e.g. from
    :func:`lacvit_dist.metrics.per_class_accuracy`) or a NaN accuracy have no bar and read "n/a". Up to
    ``MAX_BAR_LABELS`` (100) classes every row carries its name and value; beyond, rows are a few pixels
    high and unlabelled. Grid lines at 0, 0.25, 0.5, 0.75, 1 and a dashed line at the mean over the
    present classes. Returns ``[H, W, 3]`` uint8.
    """
    a = _to_numpy(acc).astype(np.float64).reshape(-1)
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
    labelled = c <= MAX_BAR_LABELS
    line = _line_height()
    row = line + 2 if labelled else max(1, min(6, 900 // c))
    name_w = max(_text_size(n)[0] for n in names) + 8 if labelled else 0
    plot_w, value_w = 400, (_text_size("0.000")[0] + 8 if labelled else 0)
    left, top = name_w + 4, line + 4
    width = left + plot_w + value_w + 8
    height = top + c * row + line + 8
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    bottom = top + c * row
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_w
        draw.line([(x, top), (x, bottom)], fill=LIGHT_GREY)
        _text(draw, (x, bottom + 2), f"{tick:g}", fill=GREY, anchor="ma")
    colours = class_colors(c)
    for k in range(c):
        y0 = top + k * row
        if labelled:
            _text(draw, (left - 4, y0 + row / 2), names[k], anchor="rm")
        if not present[k]:
            if labelled:
                _text(draw, (left + 4, y0 + row / 2), "n/a", fill=GREY, anchor="lm")
            continue
        v = float(np.clip(a[k], 0.0, 1.0))
        x1 = left + max(1, round(v * plot_w))
        gap = 1 if row >= 4 else 0
        draw.rectangle([left, y0 + gap, x1, y0 + row - 1 - gap], fill=colours[k] if c <= 20 else (31, 119, 180))
        if labelled:
            _text(draw, (left + plot_w + 4, y0 + row / 2), f"{a[k]:.3f}", anchor="lm")
    if present.any():
        mean = float(np.clip(a[present].mean(), 0.0, 1.0))
        x = left + mean * plot_w
        for y in range(top, bottom, 6):
            draw.line([(x, y), (x, min(y + 3, bottom))], fill=(214, 39, 40), width=1)
        _text(draw, (x, 2), f"mean {a[present].mean():.3f}", fill=(214, 39, 40),
              anchor="ra" if mean > 0.5 else "la")
    return _finish(_with_title(img, title))


def scatter_image(points2d: Any, labels: Any = None, class_names: Sequence[str] | None = None, *,
                  size: int = 512, title: str | None = None, seed: int = 0) -> np.ndarray:
    """Scatter plot of 2-D points (e.g. a PCA / t-SNE projection of embeddings), coloured by class.

    ``points2d`` [N, 2]; ``labels`` [N] ints in ``[0, C)`` with ``C = len(class_names)`` (or
    ``max(labels) + 1``), or None for one colour. The axes are scaled to the points' range (equal aspect,
    5% margin); non-finite points are skipped. Points are drawn in a seeded random order so that no class
    is always on top. A legend with colour swatches and names is drawn when ``C <= MAX_LEGEND_CLASSES``
    (20). Returns ``[size, size + legend, 3]`` uint8.
    """
    p = _to_numpy(points2d).astype(np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points2d must be [N, 2], got shape {p.shape}")
    n = p.shape[0]
    if labels is None:
        lab = np.zeros(n, dtype=np.int64)
        c = 1 if class_names is None else len(class_names)
    else:
        lab = _to_numpy(labels).astype(np.int64).reshape(-1)
        if lab.shape[0] != n:
            raise ValueError(f"{lab.shape[0]} labels for {n} points")
        if lab.size and lab.min() < 0:
            raise ValueError("labels must be >= 0")
        c = len(class_names) if class_names is not None else (int(lab.max()) + 1 if lab.size else 1)
        if lab.size and lab.max() >= c:
            raise ValueError(f"label {int(lab.max())} is out of range for {c} class names")
    names = _names(class_names, c) if (class_names is not None or labels is not None) else []
    legend = labels is not None and c <= MAX_LEGEND_CLASSES
    line = _line_height()
    legend_w = (max(_text_size(s)[0] for s in names) + 30) if legend else 0
    img = Image.new("RGB", (size + legend_w, size), WHITE)
    draw = ImageDraw.Draw(img)
    margin = 12
    draw.rectangle([margin - 4, margin - 4, size - margin + 4, size - margin + 4], outline=LIGHT_GREY)

    ok = np.isfinite(p).all(axis=1)
    if ok.any():
        q = p[ok]
        lo, hi = q.min(axis=0), q.max(axis=0)
        centre, span = (lo + hi) / 2, float((hi - lo).max())
        span = span * 1.05 if span > 0 else 1.0
        scale = (size - 2 * margin) / span
        xy = (q - centre) * scale + size / 2
        xy[:, 1] = size - xy[:, 1]  # y grows upwards
        colours = class_colors(c)
        lab_ok = lab[ok]
        radius = 3 if len(q) <= 2000 else (2 if len(q) <= 20000 else 1)
        order = np.random.default_rng(seed).permutation(len(q))
        for i in order:
            x, y = xy[i]
            colour = colours[lab_ok[i]]
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    if legend:
        colours = class_colors(c)
        x0 = size + 4
        for k, name in enumerate(names[: MAX_LEGEND_CLASSES]):
            y = margin + k * (line + 4)
            draw.rectangle([x0, y + 1, x0 + line - 3, y + line - 2], fill=colours[k])
            _text(draw, (x0 + line + 2, y + line / 2), name, anchor="lm")
    return _finish(_with_title(img, title))


def mean_std_bar_image(names: Sequence[str], means: Sequence[float], stds: Sequence[float], *,
                       title: str | None = None) -> np.ndarray:
    """Horizontal bar per method: a mean in ``[0, 1]`` with a +-1 std whisker and the value as text (e.g.
    Top-1 over seeds). Returns ``[H, W, 3]`` uint8."""
    m, sd = np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)
    if not (len(names) == m.shape[0] == sd.shape[0]) or not len(names):
        raise ValueError(f"need one mean and one std per name, got {len(names)} names, {m.shape[0]} means, "
                         f"{sd.shape[0]} stds")
    line = _line_height()
    row, plot_w = 2 * line, 300
    labels = [_short(n, 40) for n in names]
    left = max(_text_size(n)[0] for n in labels) + 12
    value_w = _text_size("0.0000 ± 0.0000")[0] + 12
    top, bottom = line + 4, line + 4 + len(names) * row
    img = Image.new("RGB", (left + plot_w + value_w, bottom + line + 8), WHITE)
    draw = ImageDraw.Draw(img)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_w
        draw.line([(x, top), (x, bottom)], fill=LIGHT_GREY)
        _text(draw, (x, bottom + 2), f"{tick:g}", fill=GREY, anchor="ma")
    for k, (name, colour) in enumerate(zip(labels, class_colors(len(names)))):
        y0, mid = top + k * row, top + k * row + row / 2
        _text(draw, (left - 6, mid), name, anchor="rm")
        x1 = left + max(1, round(float(np.clip(m[k], 0, 1)) * plot_w))
        draw.rectangle([left, y0 + 3, x1, y0 + row - 4], fill=colour)
        lo, hi = (left + float(np.clip(v, 0, 1)) * plot_w for v in (m[k] - sd[k], m[k] + sd[k]))
        draw.line([(lo, mid), (hi, mid)], fill=BLACK, width=2)
        for x in (lo, hi):
            draw.line([(x, mid - 4), (x, mid + 4)], fill=BLACK, width=2)
        _text(draw, (left + plot_w + 6, mid), f"{m[k]:.4f} ± {sd[k]:.4f}", anchor="lm")
    return _finish(_with_title(img, title))


def side_by_side(images: Sequence[np.ndarray], gap: int = 12) -> np.ndarray:
    """``[H, W, 3]`` figures in one row, top-aligned on white. Returns ``[H, W, 3]`` uint8."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, height), WHITE)
    x = 0
    for im in images:
        out.paste(Image.fromarray(np.ascontiguousarray(im)), (x, 0))
        x += im.shape[1] + gap
    return _finish(out)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ``[H, W, 3]`` (or ``[H, W]``, ``[H, W, 4]``) uint8 array as a PNG, atomically.

    The image goes to a temporary file in the destination folder (created if missing) and is moved over
    ``path`` with ``os.replace``: a reader never sees a half-written PNG, and a failure leaves any earlier
    file intact. Returns the final path.
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise ValueError(f"save_png expects [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a figure is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
