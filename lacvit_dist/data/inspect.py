"""`lacvit-inspect-shards`: summarise and verify a shard set written by `lacvit-make-shards`.

    python tools/inspect_shards.py data/cub                       # every split: shards, samples, classes
    python tools/inspect_shards.py data/cub --split test --samples 5
    python tools/inspect_shards.py data/cub --verify --workers 8  # decode everything; exit 1 on a problem

Without --verify it reads only the tar headers and the small `.cls` members (image data is seeked
over), so a summary of a large set is cheap. --verify decodes every image and checks: each sample
has one image (of the info's `image_ext`) and one label, labels are integers in [0, num_classes),
keys are unique across the data set, each shard holds exactly the count `_info.json` lists, and
each tar ends with its end-of-archive marker. Structural problems (unreadable or truncated tars,
count mismatches) are reported in both modes, each on one line naming the shard and the key (or
the byte offset); the exit status is 1 when any problem was found, 0 when clean, 2 on a usage error.
A progress bar (samples read) goes to stderr; --quiet turns it off.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lacvit_dist.data.make_shards import process_pool
from lacvit_dist.data.shards import LABEL_EXT, DatasetInfo, DatasetInfoError, SplitNotFoundError, load_info

PROG = "lacvit-inspect-shards"
# webdataset's key convention: the key is the member path up to the first dot of its base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BLOCK = 512


@dataclass
class ShardReport:
    """What one shard holds: sample count, labels per class index, keys in order, problems found,
    and (when asked) descriptions of its first decoded samples."""

    path: str
    count: int = 0
    labels: Counter = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def scan_shard(path: str, image_ext: str, num_classes: int, verify: bool = False, describe: int = 0,
               class_names: Sequence[str] = ()) -> ShardReport:
    """Read one shard. Labels are always read; images are decoded when `verify` (all) or for the
    first `describe` samples. Never raises for bad data: problems are collected in the report."""
    report = ShardReport(path)
    name = os.path.basename(path)
    members: dict[str, dict[str, bytes | None]] = {}  # key -> ext -> data (None: not read)
    order: list[str] = []
    end = 0  # byte offset just past the last member read successfully
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError as exc:
                    report.problems.append(f"{name}: unreadable tar header at offset {tar.offset} ({exc}); "
                                           "truncated or corrupt shard")
                    break
                if member is None:
                    break
                if not member.isfile():
                    continue
                match = _KEY_EXT.match(member.name)
                if not match:
                    report.problems.append(f"{name}: member {member.name!r} at offset {member.offset} "
                                           "has no <key>.<ext> name")
                    continue
                key, ext = match.groups()
                position = len(order) + (key not in members)  # 1-based sample number in this shard
                data = None
                if ext == LABEL_EXT or verify or (ext == image_ext and position <= describe):
                    try:
                        data = tar.extractfile(member).read()
                    except (tarfile.ReadError, OSError, EOFError) as exc:
                        report.problems.append(f"{name}: key {key}: member {member.name} at offset "
                                               f"{member.offset} cannot be read ({exc}); truncated shard")
                        break
                if member.offset_data + member.size > os.path.getsize(path):
                    report.problems.append(f"{name}: key {key}: member {member.name} at offset {member.offset} "
                                           "runs past the end of the file; truncated shard")
                    break
                if key not in members:
                    members[key] = {}
                    order.append(key)
                if ext in members[key]:
                    report.problems.append(f"{name}: key {key}: member {member.name} appears twice")
                members[key][ext] = data
                end = member.offset_data + ((member.size + _BLOCK - 1) // _BLOCK) * _BLOCK
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.problems.append(f"{name}: cannot open as a tar file ({exc})")
        return report
    if not any("truncated" in p or "cannot open" in p for p in report.problems):
        _check_end_marker(path, name, end, report)
    for key in order:
        _check_sample(name, key, members[key], image_ext, num_classes, verify, describe, class_names, report)
    return report


def _check_end_marker(path: str, name: str, end: int, report: ShardReport) -> None:
    """A complete tar ends with two zero blocks after its last member; a file cut at a member
    boundary reads as a shorter, valid tar, and this is how it is told apart."""
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(2 * _BLOCK)
    if len(tail) < 2 * _BLOCK or tail.strip(b"\0"):
        report.problems.append(f"{name}: no end-of-archive marker at offset {end} (file size "
                               f"{os.path.getsize(path)}); truncated shard")


def _check_sample(name: str, key: str, parts: dict[str, bytes | None], image_ext: str, num_classes: int,
                  verify: bool, describe: int, class_names: Sequence[str], report: ShardReport) -> None:
    report.keys.append(key)
    report.count += 1
    label = None
    if LABEL_EXT not in parts:
        report.problems.append(f"{name}: key {key}: no .{LABEL_EXT} label member (has {sorted(parts)})")
    else:
        text = (parts[LABEL_EXT] or b"").decode("ascii", "replace").strip()
        if not re.fullmatch(r"-?\d+", text):
            report.problems.append(f"{name}: key {key}: label {text[:20]!r} is not an integer")
        elif not 0 <= int(text) < num_classes:
            report.problems.append(f"{name}: key {key}: label {int(text)} outside [0, {num_classes})")
        else:
            label = int(text)
            report.labels[label] += 1
    images = [ext for ext in parts if ext != LABEL_EXT]
    if images != [image_ext]:
        report.problems.append(f"{name}: key {key}: expected one .{image_ext} image, found "
                               f"{', '.join('.' + e for e in images) or 'none'}")
        return
    data = parts[image_ext]
    if data is None or not (verify or len(report.samples) < describe):
        return
    from PIL import Image  # deferred: a summary without --verify/--samples never decodes

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            shape = f"{image.size[0]}x{image.size[1]} {image.mode} {image.format}"
    except Exception as exc:  # PIL raises many types for corrupt data
        report.problems.append(f"{name}: key {key}: image does not decode ({type(exc).__name__}: {exc})")
        return
    if len(report.samples) < describe:
        cls = class_names[label] if label is not None and label < len(class_names) else "?"
        report.samples.append(f"{key}  label {label} ({cls})  {shape}  {len(data)} bytes")


def _scan(job: tuple) -> ShardReport:
    return scan_shard(*job)


def inspect(root: str | os.PathLike, splits: Sequence[str] | None = None, samples: int = 3,
            verify: bool = False, workers: int = 1, out=None, progress: bool = False) -> int:
    """Print the summary (and problems) of the data set at `root` to `out` (default: stdout), with a
    progress bar on stderr if `progress`; returns the number of problems found."""
    out = sys.stdout if out is None else out
    info: DatasetInfo = load_info(root)
    names = list(splits) if splits else list(info.splits)
    for split in names:
        info.split(split)  # unknown split: SplitNotFoundError naming the available ones
    print(f"{info.root}: {info.name!r}, {info.num_classes} classes, {info.image_ext} images", file=out)
    problems = 0
    seen_keys: dict[str, str] = {}
    executor = process_pool(workers) if workers > 1 else None
    bar = tqdm(total=sum(info.split(s).num_samples for s in names), desc=f"{'verify' if verify else 'scan'} "
               f"{info.name}", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for split in names:
            meta = info.split(split)
            before = [sum(meta.shard_lengths[:n]) for n in range(len(meta.filenames))]
            jobs = [(path, info.image_ext, info.num_classes, verify, max(0, samples - before[n]), info.class_names)
                    for n, path in enumerate(meta.filenames)]
            reports = []
            for report, listed in zip(executor.map(_scan, jobs) if executor else map(_scan, jobs),
                                      meta.shard_lengths):
                reports.append(report)
                bar.update(listed)  # the listed count, so the bar ends at its total even on a short shard
            problems += _print_split(info, split, meta, reports, samples, seen_keys, out)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    status = "verified: no problems" if verify and not problems else f"{problems} problem(s)" if problems else \
        "summary only (no images decoded beyond the samples shown; --verify decodes all)"
    print(status, file=out)
    return problems


def _print_split(info: DatasetInfo, split: str, meta, reports: list[ShardReport], samples: int,
                 seen_keys: dict[str, str], out) -> int:
    labels: Counter = Counter()
    problems: list[str] = []
    for report, expected in zip(reports, meta.shard_lengths):
        name = os.path.basename(report.path)
        labels.update(report.labels)
        problems.extend(report.problems)
        if report.count != expected:
            problems.append(f"{name}: holds {report.count} samples but _info.json lists {expected}")
        for key in report.keys:
            if key in seen_keys:
                problems.append(f"{name}: key {key}: duplicate key (also in {seen_keys[key]})")
            else:
                seen_keys[key] = name
    total = sum(r.count for r in reports)
    print(f"\n[{split}] {len(meta.filenames)} shard(s), {total} samples (_info.json: {meta.num_samples}), "
          f"{len(labels)} of {info.num_classes} classes present", file=out)
    width = max(len(c) for c in info.class_names)
    for label in range(info.num_classes):
        print(f"  {label:>5}  {info.class_names[label]:<{width}}  {labels.get(label, 0):>8}", file=out)
    shown = [s for r in reports for s in r.samples][:samples]
    if shown:
        print(f"  first {len(shown)} sample(s):", file=out)
        for line in shown:
            print(f"    {line}", file=out)
    for line in problems:
        print(f"  PROBLEM {line}", file=out)
    return len(problems)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="directory holding _info.json and the shards")
    parser.add_argument("--split", action="append", help="only this split (repeatable; default: all)")
    parser.add_argument("--samples", type=int, default=3, metavar="K",
                        help="decode and describe the first K samples of each split (default: %(default)s)")
    parser.add_argument("--verify", action="store_true",
                        help="decode every image and check labels, keys and per-shard counts; exit 1 on a problem")
    parser.add_argument("--workers", type=int, default=1, help="processes reading shards (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it goes to stderr)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    if args.samples < 0 or args.workers < 1:
        print(f"{PROG}: error: --samples must be >= 0 and --workers >= 1", file=sys.stderr)
        return 2
    try:
        problems = inspect(args.root, args.split, args.samples, args.verify, args.workers, progress=not args.quiet)
    except (SplitNotFoundError, FileNotFoundError, DatasetInfoError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1  # a missing or broken data set is a data problem, not a usage error
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
