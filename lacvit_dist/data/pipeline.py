"""WebDataset pipelines: an endless, resampled training stream per rank and worker, and an evaluation pass
that gives every sample of a split to exactly one rank.

Training is "resampled" (webdataset.ResampledShards): each rank x worker draws shards with replacement from
a seed derived from (run seed, rank, worker), so every rank yields batches forever and the trainer defines an
epoch as a number of optimizer steps. No rank runs dry, so no collective can hang at the end of an epoch.
"""
from __future__ import annotations

import functools
import itertools
import random
from typing import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from .shards import SplitInfo

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class BadSampleError(ValueError):
    """A sample in a shard cannot be used; the message names the shard and the key."""


def _where(sample: dict) -> str:
    return f"shard {sample.get('__url__', '?')}, key {sample.get('__key__', '?')}"


_DECODE = wds.autodecode.Decoder([wds.autodecode.imagehandler("pilrgb")])


def _to_example(sample: dict, num_classes: int, transform: Callable) -> tuple:
    """Raw webdataset sample -> (transformed image, label, key), with errors that name shard and key."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise BadSampleError(f"{_where(sample)}: no image (expected one of {IMAGE_KEYS}), has {sorted(sample)}")
    try:
        image = _DECODE({"__key__": sample["__key__"], image_key: sample[image_key]})[image_key]
    except Exception as err:  # PIL raises several types for corrupt data
        raise BadSampleError(f"{_where(sample)}: cannot decode {image_key} image: {err}") from err
    raw = sample.get("cls")
    try:
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError):
        raise BadSampleError(f"{_where(sample)}: label 'cls' is missing or not an integer: {raw!r}") from None
    if not 0 <= label < num_classes:
        raise BadSampleError(f"{_where(sample)}: label {label} outside [0, {num_classes})")
    return transform(image), label, sample["__key__"]


def _collate(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, keys = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(keys)


class _StreamRole:
    """Which of the rank's `workers` streams this DataLoader worker produces.

    The DataLoader takes batches from its workers in turn, batch b from worker b % workers. To resume after
    `start_batch` batches, worker i plays the role (i + start_batch) % workers, so the first batch after the
    restart comes from the stream whose turn it was; each role skips the batches it had already produced.
    """

    def __init__(self, seed: int, start_batch: int):
        self.seed, self.start_batch = seed, start_batch

    def resolve(self) -> tuple[int, int, int]:
        """(rank, role, batches this role already produced)."""
        rank, _, worker, workers = wds.utils.pytorch_worker_info()
        role = (worker + self.start_batch) % workers
        done = (self.start_batch - role + workers - 1) // workers if self.start_batch > role else 0
        return rank, role, done

    def stream_seed(self) -> int:
        rank, role, _ = self.resolve()
        return wds.utils.make_seed(self.seed, rank, role)


def _resume_stream(samples: Iterator[dict], role: _StreamRole, bufsize: int,
                   batch_size: int) -> Iterator[tuple[int, dict]]:
    """Shuffle (seeded per rank x role), skip what an interrupted run consumed, and number the samples."""
    rank, _, done = role.resolve()
    if bufsize > 1:
        rng = random.Random(wds.utils.make_seed(role.stream_seed(), 1))
        samples = wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(samples)
    # Skipped samples are never decoded: resuming costs reading tar bytes, not decoding images.
    yield from itertools.islice(enumerate(samples), done * batch_size, None)


def _augment(item: tuple[int, dict], role: _StreamRole, num_classes: int, transform: Callable) -> tuple:
    """Decode and transform with an RNG seeded by the sample's position in the stream, so that an image
    gets the same augmentation whether or not the run was interrupted before it."""
    index, sample = item
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(wds.utils.make_seed(role.stream_seed(), 2, index))
        return _to_example(sample, num_classes, transform)


def train_loader(split: SplitInfo, num_classes: int, transform: Callable, batch_size: int, *, seed: int,
                 num_workers: int, shuffle_buffer: int,
                 start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Endless stream of full batches (images, labels, keys) for this rank, deterministic in (seed, rank,
    num_workers); `start_batch` resumes it after that many batches exactly as an uninterrupted run goes on."""
    role = _StreamRole(seed, start_batch)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(list(split.filenames), seed=seed, deterministic=True, worker_seed=role.stream_seed),
        wds.tarfile_to_samples(),
        functools.partial(_resume_stream, role=role, bufsize=shuffle_buffer, batch_size=batch_size),
        wds.map(functools.partial(_augment, role=role, num_classes=num_classes, transform=transform)),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                        pin_memory=torch.cuda.is_available())
    return iter(loader)


def _stride(samples: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Keep sample i when i % (world x workers) is this rank-worker's slot, before any decoding."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    slot, slots = rank * workers + worker, world_size * workers
    for index, sample in enumerate(samples):
        if index % slots == slot:  # a sample is decoded only by the rank-worker that owns it
            yield sample


def eval_loader(split: SplitInfo, num_classes: int, transform: Callable, batch_size: int, *, rank: int,
                world_size: int, num_workers: int) -> DataLoader:
    """One pass over the split; across ranks and workers every sample is seen exactly once.

    Every rank-worker reads the split's tar bytes but decodes only its own 1/(world x workers) of them:
    exact for any split size, any number of shards, any world size.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(split.filenames)),
        wds.tarfile_to_samples(),
        functools.partial(_stride, rank=rank, world_size=world_size),
        wds.map(functools.partial(_to_example, num_classes=num_classes, transform=transform)),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=num_workers)
