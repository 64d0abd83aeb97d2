"""`lacvit-make-shards`: write a labelled image set as train/val/test WebDataset shards.

    lacvit-make-shards digits --out data/digits
    lacvit-make-shards imagefolder --root /data/flowers --out data/flowers --val 0.1 --test 0.2

The split is stratified and fixed by --seed; the shards and `_info.json` layout are described in
`lacvit_dist.data.shards`. User errors print one line to stderr and return 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lacvit_dist.data.shards import DatasetInfo, DatasetInfoError, Sample, write_dataset
from lacvit_dist.data.sources import (
    digits_source, encode_array, encode_file, image_folder_source, stratified_split,
)

PROG = "lacvit-make-shards"
SPLIT_ORDER = ("train", "val", "test")


class LazySamples:
    """Samples of one split, encoded only when iterated (so large sets stream), with a length
    (so the progress bar shows a total)."""

    def __init__(self, indices: np.ndarray, labels: np.ndarray, encode: Callable[[int], bytes]) -> None:
        self.indices = indices
        self.labels = labels
        self.encode = encode

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Sample]:
        for i in self.indices:
            yield Sample(self.encode(int(i)), int(self.labels[i]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a labelled image set as stratified train/val/test WebDataset shards.",
        epilog="examples:\n  %(prog)s digits --out data/digits\n"
               "  %(prog)s imagefolder --root /data/flowers --out data/flowers --format jpg")
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    digits = sub.add_parser("digits", help="scikit-learn's bundled 8x8 digits (1797 images, no download)")
    _add_common(digits, default_name="digits")
    folder = sub.add_parser("imagefolder", help="an ImageFolder tree: ROOT/<class>/<image>")
    folder.add_argument("--root", required=True, type=Path, help="directory with one sub-directory per class")
    _add_common(folder, default_name=None)
    return parser


def _add_common(parser: argparse.ArgumentParser, default_name: str | None) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory for shards and _info.json")
    parser.add_argument("--name", default=default_name,
                        help="data set name in _info.json (default: %(default)s)" if default_name
                        else "data set name in _info.json (default: the --root directory's name)")
    parser.add_argument("--samples-per-shard", type=int, default=200, help="default: %(default)s")
    parser.add_argument("--val", type=float, default=0.1, help="validation fraction (default: %(default)s)")
    parser.add_argument("--test", type=float, default=0.2, help="test fraction (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default: %(default)s)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png",
                        help="image encoding in the shards (default: %(default)s, lossless)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards and _info.json already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def split_fractions(val: float, test: float) -> dict[str, float]:
    """train/val/test fractions from --val/--test; a zero fraction drops that split."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"--val and --test must be in [0, 1) and sum to less than 1 (got val={val}, test={test})")
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    return {name: f for name, f in fractions.items() if f > 0}


def _load_source(args: argparse.Namespace) -> tuple[str, list[str], np.ndarray, Callable[[int], bytes]]:
    """(name, class names, labels, encode(index) -> bytes) for the chosen source."""
    fmt = args.format
    if args.source == "digits":
        class_names, images, labels = digits_source()
        return args.name, class_names, labels, lambda i: encode_array(images[i], fmt)
    class_names, paths, labels = image_folder_source(args.root)
    name = args.name or Path(args.root).resolve().name
    return name, class_names, labels, lambda i: encode_file(paths[i], fmt)


def run(args: argparse.Namespace) -> DatasetInfo:
    """Load the source, split it, write the shards; returns the written data set's info."""
    fractions = split_fractions(args.val, args.test)
    if args.samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be at least 1 (got {args.samples_per_shard})")
    name, class_names, labels, encode = _load_source(args)
    parts = stratified_split(labels, fractions, seed=args.seed)
    splits = {split: LazySamples(parts[split], labels, encode) for split in SPLIT_ORDER if split in parts}
    return write_dataset(args.out, name, class_names, splits, samples_per_shard=args.samples_per_shard,
                         image_ext=args.format, progress=not args.quiet, overwrite=args.overwrite)


def summary(info: DatasetInfo) -> str:
    lines = [f"wrote {info.name!r} to {info.root}: {info.num_classes} classes, {info.image_ext} images"]
    for split in info.splits.values():
        lines.append(f"  {split.name:<6} {split.num_samples:>8} samples in {len(split.filenames)} shard(s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage; return its code instead of exiting
        return _exit_code(exc.code)
    try:
        info = run(args)
    except (ValueError, OSError, DatasetInfoError) as exc:  # user errors: one line, no traceback
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(summary(info))
    return 0


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 2


if __name__ == "__main__":
    raise SystemExit(main())
