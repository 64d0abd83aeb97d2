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
import warnings
from typing import Callable, Iterator, NamedTuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from .shards import SplitInfo

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class BadSampleError(ValueError):
    """A sample in a shard cannot be used; the message names the shard and the key, `kind` says why."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


BAD_SAMPLE_KINDS = ("no_image", "undecodable_image", "bad_label", "label_out_of_range", "unreadable_tar")


def _where(sample: dict) -> str:
    return f"shard {sample.get('__url__', '?')}, key {sample.get('__key__', '?')}"


_DECODE = wds.autodecode.Decoder([wds.autodecode.imagehandler("pilrgb")])


def _to_example(sample: dict, num_classes: int, transform: Callable) -> tuple:
    """Raw webdataset sample -> (transformed image, label, key), with errors that name shard and key."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise BadSampleError("no_image", f"{_where(sample)}: no image (expected one of {IMAGE_KEYS}), "
                                         f"has {sorted(sample)}")
    try:
        image = _DECODE({"__key__": sample["__key__"], image_key: sample[image_key]})[image_key]
    except Exception as err:  # PIL raises several types for corrupt data
        raise BadSampleError("undecodable_image", f"{_where(sample)}: cannot decode {image_key} image: {err}") from err
    raw = sample.get("cls")
    try:
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError):
        raise BadSampleError("bad_label", f"{_where(sample)}: label 'cls' is missing or not an integer: "
                                          f"{raw!r}") from None
    if not 0 <= label < num_classes:
        raise BadSampleError("label_out_of_range", f"{_where(sample)}: label {label} outside [0, {num_classes})")
    return transform(image), label, sample["__key__"]


class BadSamples:
    """Per-worker tally of skipped samples (training with on_bad_sample="skip"); each batch carries a snapshot
    so that the trainer can log them. In "error" mode the first bad sample stops the run."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts = dict.fromkeys(BAD_SAMPLE_KINDS, 0)
        self.warned = 0

    def skipped(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.warned < 10:  # the counts, not the log, carry the rest
            self.warned += 1
            warnings.warn(f"skipped bad sample ({kind}): {message}")

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler for tar-level errors (truncated or corrupt tar): count and go on, or raise."""
        if not self.skip:
            raise BadSampleError("unreadable_tar", f"cannot read shard: {exn!r}") from exn
        self.skipped("unreadable_tar", repr(exn))
        return True


def _examples(items: Iterator[tuple[int, dict]], role: _StreamRole, num_classes: int, transform: Callable,
              bad: BadSamples) -> Iterator[tuple]:
    stream_seed = role.stream_seed()  # resolved inside the worker, once per stream
    for item in items:
        try:
            yield _augment(item, stream_seed, num_classes, transform)
        except BadSampleError as err:
            if not bad.skip:
                raise
            bad.skipped(err.kind, str(err))


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    bad_samples: tuple[int, dict[str, int]]  # (stream role, that stream's skipped-sample counts so far)


def _with_tally(batch: tuple, role: _StreamRole, bad: BadSamples) -> Batch:
    return Batch(*batch, bad_samples=(role.resolve()[1], dict(bad.counts)))


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


def _augment(item: tuple[int, dict], stream_seed: int, num_classes: int, transform: Callable) -> tuple:
    """Decode and transform with an RNG seeded by the sample's position in the stream, so that an image
    gets the same augmentation whether or not the run was interrupted before it."""
    index, sample = item
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(wds.utils.make_seed(stream_seed, 2, index))
        return _to_example(sample, num_classes, transform)


def train_loader(split: SplitInfo, num_classes: int, transform: Callable, batch_size: int, *, seed: int,
                 num_workers: int, shuffle_buffer: int, start_batch: int = 0,
                 skip_bad_samples: bool = True) -> Iterator[Batch]:
    """Endless stream of full batches for this rank, deterministic in (seed, rank, num_workers); `start_batch`
    resumes it after that many batches exactly as an uninterrupted run goes on. Bad samples are skipped and
    counted (or raise, naming shard and key, with skip_bad_samples=False)."""
    role = _StreamRole(seed, start_batch)
    bad = BadSamples(skip_bad_samples)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(list(split.filenames), seed=seed, deterministic=True, worker_seed=role.stream_seed),
        wds.tarfile_to_samples(handler=bad.tar_error),
        functools.partial(_resume_stream, role=role, bufsize=shuffle_buffer, batch_size=batch_size),
        functools.partial(_examples, role=role, num_classes=num_classes, transform=transform, bad=bad),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
        wds.map(functools.partial(_with_tally, role=role, bad=bad)),
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
    """One pass over the split; across ranks and workers every sample is seen exactly once. Strict: a bad
    sample stops the evaluation (naming shard and key) rather than silently shrinking the test set.

    Every rank-worker reads the split's tar bytes but decodes only its own 1/(world x workers) of them:
    exact for any split size, any number of shards, any world size.
    """
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(split.filenames)),
        wds.tarfile_to_samples(handler=BadSamples(skip=False).tar_error),
        functools.partial(_stride, rank=rank, world_size=world_size),
        wds.map(functools.partial(_to_example, num_classes=num_classes, transform=transform)),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=num_workers)
