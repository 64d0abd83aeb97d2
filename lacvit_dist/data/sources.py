"""Sample sources for shard writing: scikit-learn's digits, ImageFolder trees, a stratified split,
and image encoding helpers (array / file -> PNG, JPEG or WebP bytes)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# PIL's format name for each shard image extension, and what PIL reports for files already in it.
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# Modes each format stores without conversion; anything else (P, RGBA, CMYK, I;16, ...) becomes RGB
# because every reader converts to RGB anyway and JPEG cannot hold most of them. Grey (L) stays
# grey in PNG and JPEG: a third of the bytes, and no re-compression of grey JPEG files.
_KEEP_MODES = {"png": ("L", "RGB"), "jpg": ("L", "RGB"), "webp": ("RGB",)}
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def digits_source() -> tuple[list[str], np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 real 8x8 grey images, no download).

    Returns (class names "0".."9", images uint8 [N, 8, 8] scaled from 0..16 to 0..255, labels int64 [N]).
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import costs ~1 s

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    class_names = [str(c) for c in range(10)]
    return class_names, images, labels


def image_folder_source(root: str | os.PathLike) -> tuple[list[str], list[Path], np.ndarray]:
    """An ImageFolder tree: one sub-directory per class (sorted names = label order), image files
    (extensions in IMAGE_SUFFIXES, any case) sorted by name; hidden files and directories skipped.

    Returns (class names, file paths, labels int64) in class-then-file order.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder root {root_path} does not exist or is not a directory")
    class_dirs = sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"image folder root {root_path} has no class sub-directories")
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            raise ValueError(f"class directory {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        paths.extend(files)
        labels.extend([label] * len(files))
    return [d.name for d in class_dirs], paths, np.asarray(labels, dtype=np.int64)


def _image_files(class_dir: Path) -> list[Path]:
    """Image files directly in `class_dir`, sorted by name for a deterministic order."""
    return sorted(p for p in class_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# Stratified split
# ----------------------------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split sample indices into named parts, each class in the given proportions.

    Guarantees: every index is in exactly one split; for every class c and split s the count is
    floor or ceil of n_c * f_s (within one sample of exact); deterministic for a given seed.
    Splits are apportioned per class in one pass (rather than chaining sklearn's train_test_split,
    whose second rounding compounds the first); each class's leftover samples go to the splits
    furthest behind their overall target, so split totals also track N * f_s closely.
    Indices within a split come in a seeded random order so that consecutive shards mix classes.
    """
    labels = np.asarray(labels)
    _check_fractions(fractions)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    names = list(fractions)
    frac = np.array([fractions[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    deficit = np.zeros(len(names))  # expected minus assigned so far, per split
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        counts = _apportion(len(members), frac, deficit)
        deficit += len(members) * frac - counts
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for i in range(len(names)):
            parts[i].append(members[bounds[i]:bounds[i + 1]])
    return {name: rng.permutation(np.concatenate(p)).astype(np.int64) for name, p in zip(names, parts)}


def _check_fractions(fractions: dict[str, float]) -> None:
    if not fractions:
        raise ValueError("no split fractions given")
    bad = {k: v for k, v in fractions.items() if not (isinstance(v, (int, float)) and 0 < v <= 1)}
    if bad:
        raise ValueError(f"split fractions must be in (0, 1], got {bad}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total:.6g} ({fractions})")


def _apportion(n: int, frac: np.ndarray, deficit: np.ndarray) -> np.ndarray:
    """Counts per split summing to n, each floor or ceil of n * frac; the leftover units go to
    the splits with the largest (own remainder + running deficit), ties to the earlier split."""
    exact = n * frac
    counts = np.floor(exact + 1e-9).astype(np.int64)
    leftover = n - int(counts.sum())
    if leftover > 0:
        priority = (exact - counts) + deficit
        order = np.argsort(-priority, kind="stable")
        counts[order[:leftover]] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------

def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    """Encode a PIL image as `fmt` (png, jpg, webp), converting modes the format should not hold."""
    fmt = _check_format(fmt)
    if image.mode not in _KEEP_MODES[fmt]:
        image = image.convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    elif fmt == "jpg":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def encode_array(array: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 [H, W] (grey) or [H, W, 3] (RGB) array -> encoded bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"image array must be [H, W] or [H, W, 3], got shape {array.shape}")
    return encode_image(Image.fromarray(array), fmt)  # uint8 2-D -> mode L, [H, W, 3] -> RGB


def encode_file(path: str | os.PathLike, fmt: str = "png") -> bytes:
    """An image file's bytes in `fmt`: the original bytes when the file already is that format in
    a mode the format keeps (no second JPEG compression), otherwise decoded and re-encoded."""
    fmt = _check_format(fmt)
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode fully: a truncated file fails here, not in a training worker
            if image.format == _PIL_FORMAT[fmt] and image.mode in _KEEP_MODES[fmt]:
                return data
            return encode_image(image, fmt)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for unreadable images
        raise ValueError(f"cannot read image {path}: {exc}") from None


def _check_format(fmt: str) -> str:
    if fmt not in _PIL_FORMAT:
        raise ValueError(f"image format must be one of {sorted(_PIL_FORMAT)}, got {fmt!r}")
    return fmt
