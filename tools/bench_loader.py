"""Loader benchmark: images/s of the real stage-1 training stream (`train_loader`: tar shards, shuffle, resume
bookkeeping, per-sample augmentation seeds, decode, two augmented views) against a bare loop that decodes and
augments the SAME encoded images, held in memory, with the SAME transform in a plain torch DataLoader with the
same worker count and batch size. The ratio is the share of the bare decode + augment speed the streaming
pipeline keeps (goal: >= 0.9).

    .venv/bin/python tools/bench_loader.py --img-size 224 --workers 2 --batch 64 --batches 60
    .venv/bin/python tools/bench_loader.py --root data/cifar10 --img-size 224 --workers 8 --batches 200

Without --root, scikit-learn's digits are written as shards into a temporary folder first.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lacvit_dist.config import DataConfig
from lacvit_dist.data.make_shards import main as make_shards
from lacvit_dist.data.pipeline import decode_rgb, train_loader
from lacvit_dist.data.shards import encoded_samples, load_info
from lacvit_dist.data.transforms import ImageStats, MultiView, contrastive_view
from lacvit_dist.log import markdown_table
from lacvit_dist.train.objectives import VIEWS

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_loader.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="shard folder with _info.json (default: digits shards in a temporary folder)")
    p.add_argument("--split", default="train")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loops")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=30, help="timed batches of each loop, after one per worker")
    p.add_argument("--shuffle-buffer", type=int, default=DataConfig.shuffle_buffer)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def stage1_transform(img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The stage-1 training transform with the data config's defaults: two contrastive views."""
    d = DataConfig()
    stats = ImageStats(img_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)  # timm's ViT normalisation
    return MultiView(contrastive_view(stats, d.crop_scale_min, d.color_jitter, d.hflip), VIEWS)


class InMemoryImages(Dataset):
    """`length` items cycling over in-memory encoded images: decode (PIL, RGB) + transform, nothing else."""

    def __init__(self, samples: list[tuple[bytes, int]], transform: Callable, length: int):
        self.samples, self.transform, self.length = samples, transform, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        data, label = self.samples[index % len(self.samples)]
        return self.transform(decode_rgb(data)), label


def images_per_second(batches: Iterable, warmup: int, timed: int, label: str, quiet: bool) -> float:
    """Images/s over `timed` batches, after `warmup` batches (worker start-up, first shard opened)."""
    stream: Iterator = iter(batches)
    for _ in range(warmup):
        next(stream)
    images = 0
    start = time.perf_counter()
    for _ in tqdm(range(timed), desc=label, unit="batch", disable=quiet, file=sys.stderr, dynamic_ncols=True):
        images += len(next(stream)[1])  # the labels: one per image, whatever the views
    return images / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = args.root
        if root is None:
            root = str(Path(tmp) / "digits")
            if make_shards(["digits", "--out", root, "--quiet"]) != 0:
                raise RuntimeError("could not write the digits shards")
        info = load_info(root)
        split = info.split(args.split)
        transform = stage1_transform(args.img_size)
        warmup = max(1, args.workers)
        stream = train_loader(split, info.num_classes, transform, args.batch, seed=0, num_workers=args.workers,
                              shuffle_buffer=args.shuffle_buffer)
        loader_rate = images_per_second(stream, warmup, args.batches, "train_loader", args.quiet)
        del stream  # its workers stop before the bare loop's start
        bare = DataLoader(InMemoryImages(list(encoded_samples(split, info.image_ext)), transform, (warmup + args.batches) * args.batch),
                          batch_size=args.batch, num_workers=args.workers, drop_last=True,
                          pin_memory=torch.cuda.is_available())
        bare_rate = images_per_second(bare, warmup, args.batches, "bare loop", args.quiet)
    return {"root": root if args.root else "digits (temporary shards)", "split": args.split,
            "img_size": args.img_size, "workers": args.workers, "batch": args.batch, "batches": args.batches,
            "train_loader_images_per_s": loader_rate, "bare_images_per_s": bare_rate,
            "ratio": loader_rate / bare_rate}


def table(result: dict[str, Any]) -> str:
    settings = (f"{result['root']}, split {result['split']}: img {result['img_size']}, workers {result['workers']}, "
                f"batch {result['batch']}, {result['batches']} timed batches, {VIEWS} views per image")
    rows = [("train_loader images/s", f"{result['train_loader_images_per_s']:.1f}"),
            ("bare loop images/s", f"{result['bare_images_per_s']:.1f}"),
            ("ratio train_loader / bare", f"{result['ratio']:.3f}")]
    return settings + "\n\n" + markdown_table(("metric", "value"), rows)


def main(argv: list[str] | None = None) -> int:
    print(table(run(parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
