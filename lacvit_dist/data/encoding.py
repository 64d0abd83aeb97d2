"""Image bytes for shards: a source's payload (file path, array or bytes) encoded as PNG / JPEG / WebP, with an
optional downscale; files already in the target format and mode are kept byte for byte."""
from __future__ import annotations

import io
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image

# What a source hands out per item: a loadable file path, or a uint8 [H, W] / [H, W, 3] array.
Payload = Union[str, os.PathLike, np.ndarray, bytes]
# PIL's format name for each shard image extension, and what PIL reports for files already in it.
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# Modes each format stores without conversion; anything else (P, RGBA, CMYK, I;16, ...) becomes RGB
# because every reader converts to RGB anyway and JPEG cannot hold most of them. Grey (L) stays
# grey in PNG and JPEG: a third of the bytes, and no re-compression of grey JPEG files.
_KEEP_MODES = {"png": ("L", "RGB"), "jpg": ("L", "RGB"), "webp": ("RGB",)}
JPEG_QUALITY = 95




def encode_image(image: Image.Image, fmt: str = "png", quality: int = JPEG_QUALITY,
                 max_side: int | None = None) -> bytes:
    """Encode a PIL image as `fmt` (png, jpg, webp), converting modes the format should not hold;
    `quality` applies to JPEG; `max_side` downscales so the longer side is at most that many pixels."""
    fmt = _check_format(fmt)
    if image.mode not in _KEEP_MODES[fmt]:
        image = image.convert("RGB")
    image = _downscale(image, max_side)
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    elif fmt == "jpg":
        image.save(buf, format="JPEG", quality=_check_quality(quality))
    else:
        image.save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def encode_array(array: np.ndarray, fmt: str = "png", quality: int = JPEG_QUALITY,
                 max_side: int | None = None) -> bytes:
    """uint8 [H, W] (grey) or [H, W, 3] (RGB) array -> encoded bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"image array must be [H, W] or [H, W, 3], got shape {array.shape}")
    # uint8 2-D -> mode L, [H, W, 3] -> RGB
    return encode_image(Image.fromarray(np.ascontiguousarray(array)), fmt, quality, max_side)


def encode_file(path: str | os.PathLike, fmt: str = "png", quality: int = JPEG_QUALITY,
                max_side: int | None = None) -> bytes:
    """An image file's bytes in `fmt`: the original bytes when the file already is that format in
    a mode the format keeps and needs no downscaling (no second JPEG compression), otherwise
    decoded and re-encoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return encode_bytes(data, fmt, quality, max_side, name=str(path))


def encode_bytes(data: bytes, fmt: str = "png", quality: int = JPEG_QUALITY, max_side: int | None = None,
                 name: str = "<bytes>") -> bytes:
    """Like :func:`encode_file` for an encoded image already in memory; errors name `name`."""
    fmt = _check_format(fmt)
    _check_max_side(max_side)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode fully: a truncated file fails here, not in a training worker
            if (image.format == _PIL_FORMAT[fmt] and image.mode in _KEEP_MODES[fmt]
                    and (max_side is None or max(image.size) <= max_side)):
                return data
            return encode_image(image, fmt, quality, max_side)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # unreadable images
        raise ValueError(f"cannot read image {name}: {exc}") from None


def encode_payload(payload: Payload, fmt: str = "png", quality: int = JPEG_QUALITY,
                   max_side: int | None = None) -> bytes:
    """A source payload (file path, encoded bytes or uint8 array) -> shard image bytes."""
    if isinstance(payload, np.ndarray):
        return encode_array(payload, fmt, quality, max_side)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return encode_bytes(bytes(payload), fmt, quality, max_side)
    return encode_file(payload, fmt, quality, max_side)


def encode_many(payloads: Sequence[Payload], fmt: str = "png", quality: int = JPEG_QUALITY,
                max_side: int | None = None) -> list[bytes]:
    """:func:`encode_payload` over a batch (one task of a worker pool)."""
    return [encode_payload(p, fmt, quality, max_side) for p in payloads]


def _downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink so the longer side is `max_side` (aspect ratio kept, sides rounded, at least 1 px);
    images already small enough are returned unchanged (never upscaled)."""
    _check_max_side(max_side)
    width, height = image.size
    if max_side is None or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if width >= height:
        size = (max_side, size[1])
    else:
        size = (size[0], max_side)
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _check_format(fmt: str) -> str:
    if fmt not in _PIL_FORMAT:
        raise ValueError(f"image format must be one of {sorted(_PIL_FORMAT)}, got {fmt!r}")
    return fmt


def _check_quality(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an integer in [1, 100], got {quality!r}")
    return quality


def _check_max_side(max_side: int | None) -> None:
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
