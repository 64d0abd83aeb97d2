"""`lacvit-make-shards`: write a labelled image set as train/val/test WebDataset shards.

    lacvit-make-shards digits --out data/digits
    lacvit-make-shards imagefolder --root /data/my_images --out data/mine --val 0.1 --test 0.2
    lacvit-make-shards cifar10 --root ~/Downloads/cifar-10-python.tar.gz --out data/cifar10
    lacvit-make-shards cub --root /data/CUB_200_2011 --out data/cub --format jpg --max-side 512 --workers 8

Sources without an official split (digits, imagefolder) get a stratified train/val/test split
fixed by --seed. The others keep their official split: the official test set becomes "test" and
never enters train or val; "val" is carved from the official train set (stratified, --val, seeded),
except for 102 Flowers, whose official val set is used as published.

Split order: with --shuffle (the default) train comes in a seeded random order so that every shard
mixes classes; val and test stay in the source's order (official sources) or the stratified split's
seeded order (digits, imagefolder). --no-shuffle writes every split in source order.

Images are encoded in --workers processes; the output is byte-identical for any number of workers.
The shards and `_info.json` layout are described in `lacvit_dist.data.shards`. User errors print one
line to stderr and return 2.
"""
from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lacvit_dist.data.shard_writer import write_dataset
from lacvit_dist.data.shards import DatasetInfo, DatasetInfoError, Sample
from lacvit_dist.data.encoding import encode_many, encode_payload, JPEG_QUALITY
from lacvit_dist.data.sources import Source, SourceError, SOURCES
from lacvit_dist.data.splits import stratified_split

PROG = "lacvit-make-shards"
SPLIT_ORDER = ("train", "val", "test")
DEFAULT_VAL = 0.1
DEFAULT_TEST = 0.2
CHUNK = 16  # payloads per worker task


class LazySamples:
    """Samples of one split, encoded only when iterated (so large sets stream), with a length (so the
    progress bar shows a total). With an executor, chunks of payloads are encoded in worker
    processes, at most `window` chunks ahead of the writer, and yielded in index order."""

    def __init__(self, indices: np.ndarray, source: Source, encode_opts: dict[str, Any],
                 executor: Executor | None = None, window: int = 8, chunk: int = CHUNK) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.source = source
        self.encode_opts = encode_opts
        self.executor = executor
        self.window = max(1, window)
        self.chunk = max(1, chunk)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Sample]:
        labels = self.source.labels
        if self.executor is None:
            for i in self.indices:
                yield Sample(encode_payload(self.source.payload(int(i)), **self.encode_opts), int(labels[i]))
            return
        encode = partial(encode_many, **self.encode_opts)
        pending: deque = deque()
        try:
            for start in range(0, len(self.indices), self.chunk):
                idx = self.indices[start:start + self.chunk]
                pending.append((idx, self.executor.submit(encode, [self.source.payload(int(i)) for i in idx])))
                if len(pending) >= self.window:
                    yield from self._collect(*pending.popleft())
            while pending:
                yield from self._collect(*pending.popleft())
        finally:
            for _, future in pending:  # an error or an abandoned iterator: drop the queued work
                future.cancel()

    def _collect(self, idx: np.ndarray, future) -> Iterator[Sample]:
        for i, image in zip(idx, future.result()):
            yield Sample(image, int(self.source.labels[i]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a labelled image set as train/val/test WebDataset shards.",
        epilog="examples:\n  %(prog)s digits --out data/digits\n"
               "  %(prog)s imagefolder --root /data/my_images --out data/mine --format jpg\n"
               "  %(prog)s cifar100 --root cifar-100-python.tar.gz --out data/cifar100\n"
               "  %(prog)s cub --root CUB_200_2011 --out data/cub --format jpg --max-side 512 --workers 8\n"
               "  %(prog)s pets --root oxford-iiit-pet --out data/pets\n"
               "  %(prog)s flowers --root flowers102 --out data/flowers")
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    roots = {
        "imagefolder": ("an ImageFolder tree: ROOT/<class>/<image> (stratified split)",
                        "directory with one sub-directory per class"),
        "cifar10": ("CIFAR-10, official python version (official train/test)",
                    "cifar-10-python.tar.gz, or its extracted cifar-10-batches-py/"),
        "cifar100": ("CIFAR-100, official python version, fine labels (official train/test)",
                     "cifar-100-python.tar.gz, or its extracted cifar-100-python/"),
        "cub": ("CUB-200-2011 (official train_test_split.txt)", "the CUB_200_2011/ folder (or its parent)"),
        "pets": ("Oxford-IIIT Pet (official trainval.txt / test.txt)",
                 "folder with annotations/trainval.txt, annotations/test.txt and images/"),
        "flowers": ("Oxford 102 Flowers (official setid.mat train/val/test)",
                    "folder with imagelabels.mat, setid.mat and jpg/"),
    }
    digits = sub.add_parser("digits", help="scikit-learn's bundled 8x8 digits (1797 images, stratified split)")
    _add_common(digits, default_name="digits", official=False)
    for source, (help_text, root_help) in roots.items():
        sp = sub.add_parser(source, help=help_text)
        sp.add_argument("--root", required=True, type=Path, help=root_help)
        _add_common(sp, default_name=None, official=source != "imagefolder", has_val=source != "flowers")
    return parser


def _add_common(parser: argparse.ArgumentParser, default_name: str | None, official: bool,
                has_val: bool = True) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory for shards and _info.json")
    parser.add_argument("--name", default=default_name,
                        help="data set name in _info.json (default: %(default)s)" if default_name
                        else "data set name in _info.json (default: the source's name)")
    parser.add_argument("--samples-per-shard", type=int, default=200, help="default: %(default)s")
    parser.add_argument("--max-shard-size", type=float, default=None, metavar="BYTES",
                        help="also start a new shard once one holds this many bytes, e.g. 1e9 "
                             "(default: 3e9, webdataset's)")
    if official and has_val:
        parser.add_argument("--val", type=float, default=DEFAULT_VAL,
                            help="fraction of the official train set carved out as val (stratified; "
                                 "0 = no val split; default: %(default)s)")
    elif not official:
        parser.add_argument("--val", type=float, default=DEFAULT_VAL, help="validation fraction (default: %(default)s)")
        parser.add_argument("--test", type=float, default=DEFAULT_TEST, help="test fraction (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split and of the train order (default: %(default)s)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png",
                        help="image encoding in the shards (default: %(default)s, lossless); source files "
                             "already in this format and not downscaled are copied byte for byte")
    parser.add_argument("--quality", type=int, default=JPEG_QUALITY,
                        help="JPEG quality of re-encoded images, 1-100 (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=None, metavar="N",
                        help="downscale images whose longer side exceeds N pixels (aspect ratio kept)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes encoding images; output identical for any value (default: %(default)s)")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                        help="write train in a seeded random order so shards mix classes (default: on); "
                             "--no-shuffle writes every split in source order")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shard set already in --out; the new set is written beside it and "
                             "swapped in only when complete, so a failed or interrupted run keeps the old one")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def split_fractions(val: float, test: float) -> dict[str, float]:
    """train/val/test fractions from --val/--test; a zero fraction drops that split."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"--val and --test must be in [0, 1) and sum to less than 1 (got val={val}, test={test})")
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    return {name: f for name, f in fractions.items() if f > 0}


def plan_splits(source: Source, val: float | None, test: float | None, seed: int,
                shuffle: bool = True) -> dict[str, np.ndarray]:
    """Item indices per output split (train, val, test order) for `source`; see the module docstring."""
    labels = source.labels
    if source.splits is None:  # no official split: stratified train/val/test
        parts = stratified_split(labels, split_fractions(DEFAULT_VAL if val is None else val,
                                                         DEFAULT_TEST if test is None else test), seed=seed)
        out = {s: parts[s] for s in SPLIT_ORDER if s in parts}
        return out if shuffle else {s: np.sort(idx) for s, idx in out.items()}
    if test is not None:
        raise ValueError(f"{source.name} has an official test split; --test does not apply")
    official = source.splits
    if "val" in official:
        if val is not None:
            raise ValueError(f"{source.name} has an official val split; --val does not apply")
        out = {"train": np.sort(official["train"]), "val": np.asarray(official["val"]),
               "test": np.asarray(official["test"])}
    else:
        val = DEFAULT_VAL if val is None else val
        if not 0 <= val < 1:
            raise ValueError(f"--val must be in [0, 1) (got {val})")
        train = np.asarray(official["train"])
        out = {"train": np.sort(train)}
        if val > 0:  # carved from the official train set only: test items never reach train or val
            parts = stratified_split(labels[train], {"train": 1.0 - val, "val": val}, seed=seed)
            out = {"train": np.sort(train[parts["train"]]), "val": np.sort(train[parts["val"]])}
        out["test"] = np.asarray(official["test"])
    if shuffle:
        out["train"] = np.random.default_rng(seed).permutation(out["train"])
    _check_disjoint(source.name, out)
    for split, idx in out.items():
        if len(idx) == 0:
            raise ValueError(f"{source.name}: split {split!r} would be empty"
                             + (" (--val too small for this data set?)" if split == "val" else ""))
    return out


def _check_disjoint(name: str, splits: dict[str, np.ndarray]) -> None:
    seen: dict[int, str] = {}
    for split, idx in splits.items():
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"{name}: split {split!r} lists an item twice")
        for i in idx.tolist():
            if i in seen:
                raise ValueError(f"{name}: item {i} is in both {seen[i]!r} and {split!r}")
            seen[i] = split


def load_source(args: argparse.Namespace) -> Source:
    if args.source == "digits":
        return SOURCES["digits"](args.name or "digits")
    return SOURCES[args.source](args.root, name=args.name) if args.name else SOURCES[args.source](args.root)


def run(args: argparse.Namespace) -> DatasetInfo:
    """Load the source, split it, write the shards; returns the written data set's info."""
    if args.samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be at least 1 (got {args.samples_per_shard})")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1 (got {args.workers})")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be in [1, 100] (got {args.quality})")
    if args.max_side is not None and args.max_side < 1:
        raise ValueError(f"--max-side must be at least 1 (got {args.max_side})")
    if args.max_shard_size is not None and not args.max_shard_size > 0:
        raise ValueError(f"--max-shard-size must be a positive number of bytes (got {args.max_shard_size})")
    val, test = getattr(args, "val", None), getattr(args, "test", None)
    if args.source in ("digits", "imagefolder"):
        split_fractions(val, test)  # validate before reading a large tree
    source = load_source(args)
    parts = plan_splits(source, val, test, args.seed, args.shuffle)
    encode_opts = {"fmt": args.format, "quality": args.quality, "max_side": args.max_side}
    notes = dict(source.notes) | {"seed": args.seed, "shuffle_train": args.shuffle, "format": args.format,
                                  "max_side": args.max_side}
    if args.format == "jpg":
        notes["jpeg_quality"] = args.quality
    executor = process_pool(args.workers) if args.workers > 1 else None
    try:
        splits = {split: LazySamples(idx, source, encode_opts, executor, window=4 * args.workers)
                  for split, idx in parts.items()}
        return write_dataset(args.out, source.name, source.class_names, splits,
                             samples_per_shard=args.samples_per_shard, image_ext=args.format,
                             progress=not args.quiet, overwrite=args.overwrite,
                             max_shard_size=args.max_shard_size, notes=notes)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool for the shard tools. forkserver where available: by the time workers start, the parent has
    imported torch and runs progress-bar threads, and forking a threaded process is unsafe. Workers ignore
    Ctrl-C (SIGINT reaches the whole process group): the parent alone stops, cleans up and shuts them down.
    Like every non-fork pool, it needs the calling script's `if __name__ == "__main__":` guard."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(workers, mp_context=context,
                               initializer=partial(signal.signal, signal.SIGINT, signal.SIG_IGN))


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
        with warnings.catch_warnings():  # e.g. leftovers of an interrupted write: one plain line each
            warnings.showwarning = lambda message, *_, **__: print(f"{PROG}: warning: {message}", file=sys.stderr)
            info = run(args)
    except (ValueError, OSError, DatasetInfoError, SourceError) as exc:  # user errors: one line
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.out} is as it was before this run", file=sys.stderr)
        return 130  # the shell's code for a SIGINT exit
    print(summary(info))
    return 0


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 2


if __name__ == "__main__":
    raise SystemExit(main())
