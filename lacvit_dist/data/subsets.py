"""Class subsets of a shard set: the source and target data sets of a transfer experiment.

`write_class_subset` copies the samples of chosen classes from every split of a shard set into a new shard
set, with labels renumbered 0..k-1 in the order given. The image bytes are copied, never decoded or
re-encoded, and each split stays the split it was (a train sample never becomes a test sample), so the
subset's train/val/test partition is the original stratified one restricted to those classes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from lacvit_dist.data.shard_writer import write_dataset
from lacvit_dist.data.shards import DatasetInfo, encoded_samples, load_info


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """Class indices from "0-4", "5,7,9" or a mix ("0-2,7"); every index must be in [0, num_classes)."""
    classes: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"class list {spec!r}: {part!r} is not an index or a range like 0-4") from None
        if not 0 <= first <= last < num_classes:
            raise ValueError(f"class list {spec!r}: {part!r} is outside the data set's classes 0-{num_classes - 1}")
        classes.extend(range(first, last + 1))
    if len(set(classes)) != len(classes):
        raise ValueError(f"class list {spec!r} names a class twice")
    return classes


def _relabelled(samples: Iterator[tuple[bytes, int]], new_label: dict[int, int]) -> Iterator[tuple[bytes, int]]:
    return ((image, new_label[label]) for image, label in samples if label in new_label)


def write_class_subset(info: DatasetInfo, classes: Sequence[int], out_root: str | os.PathLike, name: str,
                       samples_per_shard: int = 128) -> DatasetInfo:
    """Write the samples of `classes` (every split) under `out_root`; label classes[i] becomes i.

    An existing complete subset with the same source and classes is reused, so that a restarted experiment
    does not rewrite its data; anything else already at `out_root` is refused by `write_dataset`."""
    out = Path(out_root)
    notes = {"subset_of": info.root, "classes": list(classes),
             "class_names": [info.class_names[c] for c in classes]}
    if (out / "_info.json").is_file():
        if json.loads((out / "_info.json").read_text()).get("source") == notes:
            return load_info(out)
    new_label = {old: new for new, old in enumerate(classes)}
    splits = {name_: _relabelled(encoded_samples(split, info.image_ext), new_label)
              for name_, split in info.splits.items()}
    return write_dataset(out, name, notes["class_names"], splits, samples_per_shard=samples_per_shard,
                         image_ext=info.image_ext, progress=False, notes=notes)
