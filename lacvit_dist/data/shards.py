"""WebDataset shards on disk: their layout and reading their metadata (`_info.json`); writing them is
`lacvit_dist.data.shard_writer`.

Layout of a data set root::

    OUT/train-000000.tar  OUT/train-000001.tar ...  OUT/val-000000.tar ...  OUT/test-000000.tar
    OUT/_info.json

Each sample in a shard is two tar members, ``<key>.<ext>`` (encoded image bytes, ext ``png`` /
``jpg`` / ``webp``) and ``<key>.cls`` (the integer label as ASCII text), with
``key = f"{split}_{n:07d}"`` (n = position within the split). ``_info.json`` follows the layout of
timm's WebDataset reader (``timm/data/readers/reader_wds.py``: top-level ``name`` and ``splits``,
each split with ``name``, ``num_samples``, ``filenames`` relative to the root, ``shard_lengths``),
so ``timm.data.create_dataset("wds/<name>", root=OUT, split="train")`` reads it unchanged, plus
``num_classes``, ``class_names`` (index = label) and ``image_ext``.

A set is written into a sibling folder and swapped in whole once every shard and ``_info.json`` are
complete (`shard_writer.write_dataset`), so a root never holds a half-written or half-replaced set; a root
without ``_info.json`` is refused by :func:`load_info`.

A shard name may also be a webdataset ``pipe:`` URL (``pipe:aws s3 cp s3://bucket/train-000000.tar -``),
which webdataset runs as a shell command. :func:`load_info` refuses such names, naming split and shard,
unless ``allow_pipe_urls=True`` (``data.allow_pipe_urls``); every other name becomes an absolute local path,
which webdataset never reads as a URL.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple



INFO_FILE = "_info.json"
PIPE_PREFIX = "pipe:"
INFO_VERSION = 1
IMAGE_EXTS = ("png", "jpg", "webp")
LABEL_EXT = "cls"
class DatasetInfoError(ValueError):
    """`_info.json` exists but is not a valid description of a shard set."""


class SplitNotFoundError(KeyError):
    """A split name that the data set does not have (a KeyError with a readable message)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class Sample(NamedTuple):
    """One sample to write: encoded image bytes and its integer label."""

    image: bytes
    label: int


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split; `filenames` are absolute paths (or pipe: URLs, where allowed)."""

    name: str
    filenames: tuple[str, ...]
    shard_lengths: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)


@dataclass(frozen=True)
class DatasetInfo:
    """Everything `_info.json` says about a shard set, with shard paths resolved against `root`."""

    root: str
    name: str
    class_names: tuple[str, ...]
    splits: dict[str, SplitInfo]
    image_ext: str = "png"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> SplitInfo:
        """The split called `name`; a clear error naming the root and the splits it has otherwise."""
        try:
            return self.splits[name]
        except KeyError:
            raise SplitNotFoundError(
                f"data set {self.root} has no split {name!r}; available splits: {sorted(self.splits)}"
            ) from None


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def load_info(root: str | os.PathLike, *, allow_pipe_urls: bool = False) -> DatasetInfo:
    """Read and validate `root/_info.json`; every listed shard must exist on disk. Shard names that are
    pipe: URLs (shell commands) are refused unless `allow_pipe_urls`, then kept verbatim."""
    if str(root).startswith(PIPE_PREFIX):
        raise DatasetInfoError(f"data root {str(root)!r} is a webdataset pipe: URL; the root must be a local "
                               f"folder holding {INFO_FILE} (the shards it lists may be pipe: URLs, with "
                               f"data.allow_pipe_urls=true)")
    root_path = Path(root).expanduser().resolve()
    info_path = root_path / INFO_FILE
    if not info_path.is_file():
        hint = " (an unfinished write?)" if any(root_path.glob("*.tar")) else ""
        raise FileNotFoundError(f"no data set info file {info_path}{hint}; write shards with lacvit-make-shards")
    try:
        raw = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetInfoError(f"{info_path} is not valid JSON: {exc}") from None
    return _parse_info(raw, root_path, info_path, allow_pipe_urls)


def encoded_samples(split: SplitInfo, image_ext: str) -> Iterator[tuple[bytes, int]]:
    """Every (encoded image bytes, label) of a split, in shard order, nothing decoded; a sample without its
    image or label member is an error naming shard and key."""
    import webdataset as wds  # deferred: it imports torch, which reading _info.json never needs

    for sample in wds.DataPipeline(wds.SimpleShardList(list(split.filenames)), wds.tarfile_to_samples()):
        if image_ext not in sample or LABEL_EXT not in sample:
            raise ValueError(f"shard {sample.get('__url__')}, key {sample.get('__key__')}: expected .{image_ext} "
                             f"and .{LABEL_EXT} members, has {sorted(sample)}")
        yield sample[image_ext], int(sample[LABEL_EXT])


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str, info_path: Path) -> Any:
    """obj[key], checked for type; the error names the file and the key path."""
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetInfoError(f"{info_path}: missing key {where}{key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DatasetInfoError(f"{info_path}: key {where}{key!r} has type {type(value).__name__}")
    return value


def _parse_info(raw: Any, root: Path, info_path: Path, allow_pipe_urls: bool) -> DatasetInfo:
    if not isinstance(raw, dict):
        raise DatasetInfoError(f"{info_path}: top level must be a JSON object")
    name = _require(raw, "name", str, "", info_path)
    class_names = _require(raw, "class_names", list, "", info_path)
    if not class_names or not all(isinstance(c, str) for c in class_names):
        raise DatasetInfoError(f"{info_path}: key 'class_names' must be a non-empty list of strings")
    num_classes = raw.get("num_classes", len(class_names))
    if num_classes != len(class_names):
        raise DatasetInfoError(
            f"{info_path}: 'num_classes' is {num_classes} but 'class_names' has {len(class_names)} entries")
    image_ext = raw.get("image_ext", "png")
    if image_ext not in IMAGE_EXTS:
        raise DatasetInfoError(f"{info_path}: 'image_ext' is {image_ext!r}, expected one of {IMAGE_EXTS}")
    splits_raw = _require(raw, "splits", dict, "", info_path)
    if not splits_raw:
        raise DatasetInfoError(f"{info_path}: key 'splits' is empty")
    splits = {key: _parse_split(key, value, root, info_path, allow_pipe_urls) for key, value in splits_raw.items()}
    return DatasetInfo(root=str(root), name=name, class_names=tuple(class_names), splits=splits,
                       image_ext=image_ext)


def _parse_split(key: str, raw: Any, root: Path, info_path: Path, allow_pipe_urls: bool) -> SplitInfo:
    where = f"'splits'.{key!r}."
    if not isinstance(raw, dict):
        raise DatasetInfoError(f"{info_path}: key 'splits'.{key!r} must be an object")
    filenames = _require(raw, "filenames", list, where, info_path)
    lengths = _require(raw, "shard_lengths", list, where, info_path)
    num_samples = _require(raw, "num_samples", int, where, info_path)
    if len(filenames) != len(lengths):
        raise DatasetInfoError(f"{info_path}: split {key!r} lists {len(filenames)} filenames "
                               f"but {len(lengths)} shard_lengths")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise DatasetInfoError(f"{info_path}: key {where}'shard_lengths' must hold non-negative integers")
    if sum(lengths) != num_samples:
        raise DatasetInfoError(f"{info_path}: split {key!r} has num_samples {num_samples} "
                               f"but its shard_lengths sum to {sum(lengths)}")
    if not all(isinstance(fname, str) for fname in filenames):
        raise DatasetInfoError(f"{info_path}: key {where}'filenames' must hold strings")
    paths = tuple(_shard_path(fname, key, root, info_path, allow_pipe_urls) for fname in filenames)
    return SplitInfo(name=key, filenames=paths, shard_lengths=tuple(lengths))


def _shard_path(fname: str, split: str, root: Path, info_path: Path, allow_pipe_urls: bool) -> str:
    """A listed shard as webdataset will open it: an existing absolute path, or an allowed pipe: URL."""
    if fname.startswith(PIPE_PREFIX):
        if not allow_pipe_urls:
            raise DatasetInfoError(
                f"{info_path}: split {split!r} lists shard {fname!r}, a pipe: URL that webdataset would run as a "
                f"shell command; refused. Set data.allow_pipe_urls=true only for an {INFO_FILE} you trust")
        return fname
    path = (root / fname).resolve()  # relative names (timm's convention) resolve against the root
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} listed in {info_path} (split {split!r}) does not exist")
    return str(path)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
