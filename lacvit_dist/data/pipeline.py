"""WebDataset pipelines: the training stream of each rank (endless, exactly resumable) and an evaluation pass
that gives every sample of a split to exactly one rank.

Training has two epoch modes (data.epoch_mode):

- "resampled" (webdataset.ResampledShards): each rank x worker draws shards with replacement from a seed
  derived from (run seed, rank, worker); the trainer defines an epoch as a number of optimizer steps.
- "finite": each epoch shuffles the shard list with (seed, epoch), identically on every rank, and deals it to
  the ranks, then to each rank's workers; a stream reads its shards once per epoch, so an epoch sees every
  sample at most once (exactly once with even shards). Every stream yields the same number of batches per
  epoch (:func:`finite_epoch_plan`, from `_info.json`'s shard lengths), so no rank runs dry before another
  and no collective hangs; epochs follow each other seamlessly in one endless stream.

Both modes can mix batches class-aware (every class in a batch appears at least m + 1 times) and resume after
`start_batch` batches exactly as the uninterrupted stream goes on: same samples, same augmentations. Each batch
carries its stream's position (units read, bad ones included); resuming from those positions stays exact when
bad samples were dropped before the checkpoint.
"""
from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import multiprocessing
import os
import random
import select
import threading
import time
import warnings
from typing import Callable, Iterable, Iterator, Literal, NamedTuple

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, default_collate, get_worker_info

from lacvit_dist.data.shards import SplitInfo

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
EPOCH_MODES = ("resampled", "finite")
EpochMode = Literal["resampled", "finite"]

log = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A sample (or the rest of a shard) cannot be used; the message names split, shard and key, `kind` says why.
    Built from the message alone it is still itself: a DataLoader worker's error reaches the caller unchanged."""

    def __init__(self, message: str, kind: str = "unknown"):
        super().__init__(message)
        self.kind = kind


BAD_SAMPLE_KINDS = ("no_image", "undecodable_image", "bad_label", "label_out_of_range", "unreadable_tar")


class FiniteEpochError(ValueError):
    """The shards cannot be dealt to every rank x worker stream of a finite epoch."""


def _where(sample: dict) -> str:
    split = f"split {sample['__split__']!r}, " if "__split__" in sample else ""
    return f"{split}shard {sample.get('__url__', '?')}, key {sample.get('__key__', '?')}"


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image -> RGB PIL image, the pixels webdataset's "pilrgb" decoder gives, without its handler
    chain and second full-image copy (it converts twice): a third of the decoding time of a small PNG."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _label(sample: dict, num_classes: int) -> int:
    """The sample's integer label from its 'cls' member, checked against the number of classes."""
    raw = sample.get("cls")
    try:
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError):
        raise BadSampleError(f"{_where(sample)}: label 'cls' is missing or not an integer: {raw!r}",
                             "bad_label") from None
    if not 0 <= label < num_classes:
        raise BadSampleError(f"{_where(sample)}: label {label} outside [0, {num_classes})", "label_out_of_range")
    return label


def _to_example(sample: dict, num_classes: int, transform: Callable) -> tuple:
    """Raw webdataset sample -> (transformed image, label, key), with errors that name shard and key."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise BadSampleError(f"{_where(sample)}: no image (expected one of {IMAGE_KEYS}), has {sorted(sample)}",
                             "no_image")
    try:
        image = decode_rgb(sample[image_key])
    except Exception as err:  # PIL raises several types for corrupt data
        raise BadSampleError(f"{_where(sample)}: cannot decode {image_key} image: {err}", "undecodable_image") from err
    label = _label(sample, num_classes)
    return transform(image), label, sample["__key__"]


class BadSamples:
    """Per-worker tally of skipped samples, in samples per kind (reads of the train split with
    on_bad_sample="skip"); each batch carries a snapshot so that the trainer can log them. In "error" mode the
    first bad sample stops the run."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts = dict.fromkeys(BAD_SAMPLE_KINDS, 0)
        self.warned = 0

    def reset(self) -> None:
        """Forget the counts: a resumed stream re-reads what it skips, whose bad samples the checkpoint holds."""
        self.counts = dict.fromkeys(BAD_SAMPLE_KINDS, 0)

    def skipped(self, kind: str, message: str, samples: int = 1) -> None:
        self.counts[kind] += samples
        if self.warned < 10:  # the counts, not the log, carry the rest
            self.warned += 1
            warnings.warn(f"skipped bad sample ({kind}): {message}")

    def handle(self, err: BadSampleError) -> None:
        """Count and go on, or (strict) raise it."""
        if not self.skip:
            raise err
        self.skipped(err.kind, str(err))


def _read_shards(sources: Iterable[dict], split: SplitInfo, bad: BadSamples,
                 count_lost: bool = True) -> Iterator[dict]:
    """The samples of each shard ({"url": ...} sources), tagged with the split's name for error messages.

    A shard that ends before the number of samples `_info.json` lists for it is unreadable: tarfile stops
    without a word at a tar cut between two members, and webdataset's handler sees only the cuts inside one.
    Its missing samples are counted as "unreadable_tar" (skip mode; only if `count_lost`, when several readers
    share the shard) or stop the read with an error naming split and shard."""
    listed = dict(zip(split.filenames, split.shard_lengths))
    for source in sources:
        url, errors, read = source["url"], [], 0

        def note(exn: Exception) -> bool:  # decided once the shard has ended: how many samples it lost
            errors.append(exn)
            return True

        for sample in wds.tarfile_to_samples(handler=note)(iter([dict(source)])):
            sample["__split__"] = split.name
            read += 1
            yield sample
        lost = listed.get(url, read) - read
        if lost > 0 or errors:
            message = (f"split {split.name!r}, shard {url}: unreadable tar, read {read} of the {read + lost} samples "
                       f"{'_info.json lists' if url in listed else 'expected'}"
                       + (f" ({errors[0]})" if errors else " (cut short?)"))
            if not bad.skip:
                raise BadSampleError(message, "unreadable_tar")
            if count_lost:
                bad.skipped("unreadable_tar", message, max(0, lost))


class StreamPosition(NamedTuple):
    """Where a stream stands after a batch: `units` read of `epoch` (finite mode; 0 in resampled mode), the
    dropped bad ones included. A resumed stream skips exactly these, decoding none."""

    epoch: int
    units: int


class StreamState(NamedTuple):
    role: int  # which of the rank's streams produced the batch (see _StreamRole)
    position: StreamPosition
    bad_samples: dict[str, int]  # that stream's skipped-sample counts since this (re)start


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    stream: StreamState


def _collate(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, keys = zip(*samples)
    # default_collate stacks straight into shared memory inside a DataLoader worker, sparing a copy of the
    # whole batch on its way to the trainer (77 MB for 64 images of two 224 px views).
    return default_collate(images), torch.tensor(labels, dtype=torch.long), list(keys)


# ---------------------------------------------------------------------------------------------- stream roles
class _StreamRole:
    """Which of the rank's `workers` streams this DataLoader worker produces.

    The DataLoader takes batches from its workers in turn, batch b from worker b % workers. To resume after
    `start_batch` batches, worker i plays the role (i + start_batch) % workers, so the first batch after the
    restart comes from the stream whose turn it was; each role skips the batches it had already produced.
    """

    def __init__(self, seed: int, start_batch: int, rank: int, positions: dict[int, StreamPosition]):
        self.seed, self.start_batch, self.rank, self.positions = seed, start_batch, rank, positions

    def resolve(self) -> tuple[int, int, int]:
        """(role, batches this role already produced, number of roles) of the calling worker."""
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        role = (worker + self.start_batch) % workers
        done = (self.start_batch - role + workers - 1) // workers if self.start_batch > role else 0
        return role, done, workers

    def stream_seed(self) -> int:
        return wds.utils.make_seed(self.seed, self.rank, self.resolve()[0])

    def units_to_skip(self, epoch: int, batches: int, units_per_batch: int) -> int:
        """Units this role read of `epoch` before the resume, whose last `batches` batches the trainer took: the
        position its last batch recorded, or (none recorded: a checkpoint from before positions were kept) as
        many as those batches hold, which is exact only if no bad sample was dropped."""
        if batches == 0:
            return 0
        role = self.resolve()[0]
        position = self.positions.get(role)
        if position is None:
            return batches * units_per_batch
        if position.epoch != epoch:
            raise ValueError(f"resume at batch {self.start_batch}: stream {role} of rank {self.rank} should stand in "
                             f"epoch {epoch}, but the checkpoint's positions say {position}")
        return position.units


def _collate_training(examples: list[tuple], role: _StreamRole) -> Batch:
    """A batch of (image, label, key, (position, bad-sample counts)) examples: the stream's state is its last
    example's. Not the state at collation: webdataset's batcher has read the next unit by then."""
    position, bad_samples = examples[-1][-1]
    batch = _collate([example[:-1] for example in examples])
    return Batch(*batch, stream=StreamState(role.resolve()[0], position, bad_samples))


# ------------------------------------------------------------------------------- units, positions, augmentation
def _shuffled(samples: Iterable[dict], seed: int, bufsize: int) -> Iterator[dict]:
    if bufsize <= 1:
        return iter(samples)
    rng = random.Random(wds.utils.make_seed(seed, 1))
    return wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(iter(samples))


def _units(samples: Iterable[dict], group_size: int, num_classes: int, bad: BadSamples) -> Iterator[list[dict]]:
    """Samples as units of training: one sample each, or (class-aware mixing, group_size = m + 1) groups of
    group_size samples of one class, each emitted as soon as its class has that many waiting. A batch of
    whole groups has every class it holds at least m + 1 times; the wait holds at most m samples per class."""
    if group_size == 1:
        yield from ([sample] for sample in samples)
        return
    waiting: dict[int, list[dict]] = {}
    for sample in samples:
        try:
            label = _label(sample, num_classes)  # the 'cls' member only: grouping decodes no image
        except BadSampleError as err:
            bad.handle(err)
            continue
        group = waiting.setdefault(label, [])
        group.append(sample)
        if len(group) == group_size:
            yield waiting.pop(label)


def _numbered(units: Iterable[list[dict]], group_size: int, skip_units: int,
              bad: BadSamples) -> Iterator[tuple[int, list[dict]]]:
    """(position of the unit's first sample in the stream, unit), after skipping what a resumed run consumed.
    Skipped units are never decoded: resuming costs reading tar bytes, not decoding images. The bad samples
    met while skipping are already in the checkpoint's counts: the stream counts from the resume point on."""
    numbered = ((n * group_size, unit) for n, unit in enumerate(units))
    if skip_units:
        for _ in itertools.islice(numbered, skip_units):
            pass
        bad.reset()
    yield from numbered


def _augment(index: int, sample: dict, stream_seed: int, num_classes: int, transform: Callable) -> tuple:
    """Decode and transform with an RNG seeded by the sample's position in the stream, so that an image
    gets the same augmentation whether or not the run was interrupted before it."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator (the transforms' only one): torch.manual_seed also queues seeding of every
        # accelerator, formatting a stack trace each time, which cost a quarter of the loader's time.
        torch.default_generator.manual_seed(wds.utils.make_seed(stream_seed, 2, index))
        return _to_example(sample, num_classes, transform)


def _examples(units: Iterable[tuple[int, list[dict]]], stream_seed: int, num_classes: int, transform: Callable,
              bad: BadSamples, epoch: int = 0) -> Iterator[tuple]:
    """Augmented examples of each unit, each marked with the stream's state after its unit (position just past
    it, bad samples counted so far); a unit with a bad sample is dropped whole (a class-aware group must not
    shrink below m + 1)."""
    for index, unit in units:
        try:
            examples = [_augment(index + i, sample, stream_seed, num_classes, transform)
                        for i, sample in enumerate(unit)]
        except BadSampleError as err:
            bad.handle(err)
            continue
        mark = (StreamPosition(epoch, index // len(unit) + 1), dict(bad.counts))
        yield from ((*example, mark) for example in examples)


class _StreamSpec(NamedTuple):
    """What every stream of a rank shares (picklable: it travels to the DataLoader workers)."""

    split: SplitInfo
    num_classes: int
    transform: Callable
    batch_size: int
    group_size: int
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int


# ------------------------------------------------------------------------------------------- resampled mode
def _resampled_stream(samples: Iterator[dict], spec: _StreamSpec, role: _StreamRole,
                      bad: BadSamples) -> Iterator[tuple]:
    """Examples of one endless resampled stream (shuffled per rank x role), from where a resumed run stops."""
    _, done, _ = role.resolve()
    stream_seed = role.stream_seed()  # resolved inside the worker, once per stream
    units = _units(_shuffled(samples, stream_seed, spec.shuffle_buffer), spec.group_size, spec.num_classes, bad)
    numbered = _numbered(units, spec.group_size, role.units_to_skip(0, done, spec.batch_size // spec.group_size), bad)
    yield from _examples(numbered, stream_seed, spec.num_classes, spec.transform, bad)


# ---------------------------------------------------------------------------------------------- finite mode
class FiniteEpochPlan(NamedTuple):
    """How a finite epoch is cut: the same number of batches on every rank, whatever the shard lengths."""

    batches_per_stream: int  # per rank x worker stream and epoch
    batches_per_rank: int  # per epoch: streams of the rank x batches_per_stream
    unused_samples: int  # per epoch, over all ranks: what the equal cut leaves out


def finite_epoch_plan(split: SplitInfo, world_size: int, num_workers: int, batch_size: int, *,
                      accumulation: int = 1, group_size: int = 1, num_classes: int = 0) -> FiniteEpochPlan:
    """Batches per epoch that every rank x worker stream is sure to fill in any epoch's shard deal, from the
    shard lengths alone: each stream gets at least shards // streams shards, at worst the smallest ones (less
    what class-aware grouping may leave waiting: m per class). Rounded so that each rank's epoch is a whole
    number of optimizer steps of `accumulation` batches."""
    if group_size > 1 and num_classes < 1:
        raise ValueError("class-aware grouping leaves up to group_size - 1 samples per class waiting: pass num_classes")
    workers = max(1, num_workers)
    streams = world_size * workers
    shards = len(split.filenames)
    if shards < streams:
        raise FiniteEpochError(
            f"data.epoch_mode=finite: split {split.name!r} has {shards} shards, fewer than {world_size} ranks x "
            f"{workers} data workers = {streams} streams, and each stream reads whole shards of its own. Re-shard "
            f"it with smaller shards (lacvit-make-shards --samples-per-shard), lower data.num_workers, or use "
            f"data.epoch_mode=resampled")
    guaranteed = sum(sorted(split.shard_lengths)[:shards // streams]) - num_classes * (group_size - 1)
    whole_steps = accumulation // math.gcd(accumulation, workers)  # batches_per_stream must be a multiple
    per_stream = max(0, guaranteed) // batch_size // whole_steps * whole_steps
    if per_stream < 1:
        raise FiniteEpochError(
            f"data.epoch_mode=finite: split {split.name!r} ({shards} shards, {split.num_samples} samples) "
            f"guarantees each of {world_size} ranks x {workers} data workers only {max(0, guaranteed)} usable "
            f"samples per epoch, less than {whole_steps} micro batch(es) of {batch_size}; use fewer ranks or "
            f"workers, smaller batches, or data.epoch_mode=resampled")
    return FiniteEpochPlan(per_stream, per_stream * workers, split.num_samples - per_stream * batch_size * streams)


def _epoch_shards(filenames: tuple[str, ...], seed: int, epoch: int, rank: int, world_size: int, role: int,
                  workers: int) -> list[str]:
    """The shards of one stream in one epoch: the whole list shuffled with (seed, epoch), the same on every
    rank, then dealt to ranks, then to the rank's workers (as split_by_node + split_by_worker do, but by
    worker role, which a resume rotates, and by explicit rank)."""
    order = list(filenames)
    random.Random(wds.utils.make_seed(seed, epoch)).shuffle(order)
    return order[rank::world_size][role::workers]


def _read_passes(shards: list[str], split: SplitInfo, epoch_seed: int, bufsize: int, bad: BadSamples,
                 where: str) -> Iterator[dict]:
    """The epoch's shuffled samples, then (only if pulled: bad samples left the stream short of its planned
    batches) one more pass, so that every rank still yields the same number of batches."""
    for fill_pass in range(2):
        if fill_pass:
            warnings.warn(f"{where}: bad samples left too few good ones for the epoch's batches; reading its "
                          f"shards a second time to fill them (some samples are seen twice this epoch)")
        raw = _read_shards(iter([{"url": url} for url in shards]), split, bad)
        yield from _shuffled(raw, wds.utils.make_seed(epoch_seed, fill_pass), bufsize)


def _finite_stream(spec: _StreamSpec, plan: FiniteEpochPlan, role: _StreamRole,
                   bad: BadSamples) -> Iterator[tuple]:
    """Examples of one stream, epoch after epoch, batches_per_stream batches each; a resumed run starts in the
    epoch and at the position where the interrupted one stopped, reading nothing of earlier epochs."""
    role_id, done, workers = role.resolve()
    epoch, skip_batches = divmod(done, plan.batches_per_stream)
    for epoch in itertools.count(epoch):
        where = f"epoch {epoch}, rank {spec.rank}, stream {role_id}"
        epoch_seed = wds.utils.make_seed(role.stream_seed(), epoch)
        shards = _epoch_shards(spec.split.filenames, spec.seed, epoch, spec.rank, spec.world_size, role_id, workers)
        units = _units(_read_passes(shards, spec.split, epoch_seed, spec.shuffle_buffer, bad, where),
                       spec.group_size, spec.num_classes, bad)
        skip_units = role.units_to_skip(epoch, skip_batches, spec.batch_size // spec.group_size)
        numbered = _numbered(units, spec.group_size, skip_units, bad)
        wanted = (plan.batches_per_stream - skip_batches) * spec.batch_size
        produced = 0
        examples = _examples(numbered, epoch_seed, spec.num_classes, spec.transform, bad, epoch)
        for example in itertools.islice(examples, wanted):
            produced += 1
            yield example
        if produced < wanted:  # only when more than half of the stream's samples were bad
            raise FiniteEpochError(f"{where}: {produced} of {wanted} samples after two passes over its shards "
                                   f"{shards}: too many bad samples")
        skip_batches = 0


def _log_plan(split: SplitInfo, plan: FiniteEpochPlan, world_size: int, batch_size: int) -> None:
    log.info("finite epochs of split %r: %d batches of %d per rank (%d ranks)%s", split.name,
             plan.batches_per_rank, batch_size, world_size,
             f"; {plan.unused_samples} of {split.num_samples} samples per epoch fall off the equal cut"
             if plan.unused_samples else "")


# ------------------------------------------------------------------------------------------------ the loader
def train_loader(split: SplitInfo, num_classes: int, transform: Callable, batch_size: int, *, seed: int,
                 num_workers: int, shuffle_buffer: int, start_batch: int = 0, skip_bad_samples: bool = True,
                 epoch_mode: EpochMode = "resampled", class_aware_m: int = 0, accumulation: int = 1,
                 rank: int | None = None, world_size: int | None = None,
                 positions: dict[int, StreamPosition] | None = None) -> Iterator[Batch]:
    """Endless stream of full batches for this rank, deterministic in (seed, rank, world_size, num_workers);
    `start_batch` resumes it after that many batches exactly as an uninterrupted run goes on, given `positions`:
    for each stream role, the position of the last batch of that role the trainer took (Batch.stream). Without
    them a resume is exact only if no bad sample was dropped before it. Bad samples are skipped and counted (or
    raise, naming shard and key, with skip_bad_samples=False).

    epoch_mode "finite": epochs of finite_epoch_plan(...).batches_per_rank batches, a whole number of
    `accumulation`-batch optimizer steps. class_aware_m > 0: every class in a batch appears at least
    class_aware_m + 1 times (batch_size must be a multiple of that). rank / world_size: default from the
    environment (RANK / WORLD_SIZE or the initialised process group).
    """
    if epoch_mode not in EPOCH_MODES:
        raise ValueError(f"epoch_mode must be one of {EPOCH_MODES}, got {epoch_mode!r}")
    group_size = class_aware_m + 1
    if class_aware_m < 0 or batch_size % group_size:
        raise ValueError(f"class-aware mixing needs a batch size ({batch_size}) that is a multiple of "
                         f"class_aware_m + 1 ({group_size}), with class_aware_m >= 0")
    env_rank, env_world, _, _ = wds.utils.pytorch_worker_info()
    rank, world_size = env_rank if rank is None else rank, env_world if world_size is None else world_size
    spec = _StreamSpec(split, num_classes, transform, batch_size, group_size, shuffle_buffer,
                       seed, rank, world_size)
    role = _StreamRole(seed, start_batch, rank, positions or {})
    bad = BadSamples(skip_bad_samples)
    if epoch_mode == "finite":
        plan = finite_epoch_plan(split, world_size, num_workers, batch_size, accumulation=accumulation,
                                 group_size=group_size, num_classes=num_classes)
        _log_plan(split, plan, world_size, batch_size)
        stages = [functools.partial(_finite_stream, spec, plan, role, bad)]
    else:
        stages = [wds.ResampledShards(list(split.filenames), seed=seed, deterministic=True,
                                      worker_seed=role.stream_seed),
                  functools.partial(_read_shards, split=split, bad=bad),
                  functools.partial(_resampled_stream, spec=spec, role=role, bad=bad)]
    pipeline = wds.DataPipeline(
        *stages,
        wds.batched(batch_size, collation_fn=functools.partial(_collate_training, role=role), partial=False),
    )
    loader = DataLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                        pin_memory=torch.cuda.is_available(), **worker_start(num_workers))
    return iter(loader)


def _eval_samples(sources: Iterable[dict], split: SplitInfo, bad: BadSamples, rank: int,
                  world_size: int) -> Iterator[dict]:
    """Keep sample i when i % (world x workers) is this rank-worker's slot, before any decoding. Every
    rank-worker reads the whole split, so the samples an unreadable shard lost are counted by slot 0 alone."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    slot, slots = rank * workers + worker, world_size * workers
    for index, sample in enumerate(_read_shards(sources, split, bad, count_lost=slot == 0)):
        if index % slots == slot:  # a sample is decoded only by the rank-worker that owns it
            yield sample


def _eval_examples(samples: Iterable[dict], num_classes: int, transform: Callable,
                   bad: BadSamples) -> Iterator[tuple]:
    for sample in samples:
        try:
            yield _to_example(sample, num_classes, transform)
        except BadSampleError as err:
            bad.handle(err)


def _tallied(batches: Iterable[tuple], bad: BadSamples) -> Iterator[tuple]:
    """Each batch with (worker, its skipped-sample counts so far); then, if samples were skipped after the
    last batch, an empty batch that carries the final counts."""
    info = get_worker_info()
    worker, sent = (info.id if info is not None else 0), dict(bad.counts)
    for batch in batches:
        sent = dict(bad.counts)
        yield (*batch, (worker, sent))
    if bad.counts != sent:
        yield torch.zeros(0), torch.zeros(0, dtype=torch.long), [], (worker, dict(bad.counts))


class EvalPass:
    """One pass over a split per iteration, as (images, labels, keys) batches; afterwards `skipped` holds the
    bad samples this rank skipped, per kind (all zero in strict mode, where the first one raises)."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.skipped = dict.fromkeys(BAD_SAMPLE_KINDS, 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        per_worker: dict[int, dict[str, int]] = {}
        self.skipped = dict.fromkeys(BAD_SAMPLE_KINDS, 0)
        for images, labels, keys, (worker, counts) in self.loader:
            per_worker[worker] = counts
            self.skipped = {kind: sum(c[kind] for c in per_worker.values()) for kind in BAD_SAMPLE_KINDS}
            if keys:
                yield images, labels, keys


def eval_loader(split: SplitInfo, num_classes: int, transform: Callable, batch_size: int, *, rank: int,
                world_size: int, num_workers: int, skip_bad_samples: bool = False) -> EvalPass:
    """One pass over the split; across ranks and workers every sample is seen exactly once. Strict by default:
    a bad sample or an unreadable shard stops the evaluation (naming split, shard and key) rather than silently
    shrinking the split. skip_bad_samples=True (reads of the train split, e.g. the kNN bank, under
    data.on_bad_sample=skip): skipped and counted in the pass's `skipped`, as training does.

    Every rank-worker reads the split's tar bytes but decodes only its own 1/(world x workers) of them:
    exact for any split size, any number of shards, any world size.
    """
    bad = BadSamples(skip_bad_samples)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(split.filenames)),
        functools.partial(_eval_samples, split=split, bad=bad, rank=rank, world_size=world_size),
        functools.partial(_eval_examples, num_classes=num_classes, transform=transform, bad=bad),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
        functools.partial(_tallied, bad=bad),
    )
    return EvalPass(DataLoader(pipeline, batch_size=None, num_workers=num_workers, **worker_start(num_workers)))


# Imported once by the fork server, so that each worker it forks has them already.
_WORKER_PRELOAD = ["__main__", __name__, "lacvit_dist.data.transforms"]


def worker_start(num_workers: int) -> dict:
    """DataLoader arguments that start workers from a fork server, never by forking this process.

    This process runs threads (DeepSpeed, gloo, TensorBoard, pin-memory); CPython before 3.11.8 / 3.12.1 can
    deadlock a child forked while another thread holds the interpreter's thread-list lock (gh-112275), and
    evaluation forks fresh workers every time. The fork server is a fresh single-threaded interpreter, started
    once per process (exec'd, so the bug cannot reach it; ~4 s on 2 loaded cores with the imports above);
    each worker it forks then costs what a plain fork does. Platforms without it spawn (never fork)."""
    if num_workers == 0:
        return {}
    if "forkserver" not in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("spawn")
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_WORKER_PRELOAD)  # takes effect when the server starts (first use)
    return {"multiprocessing_context": context, "worker_init_fn": functools.partial(_exit_with, os.getpid())}


def _exit_with(trainer: int, worker_id: int) -> None:
    """Exit this worker when the trainer process ends, however it ends (kill -9, OOM killer). torch's own check
    watches the worker's parent, which is the fork server here, and the server lives while a worker does."""
    try:
        handle = os.pidfd_open(trainer)  # readable once the process has ended (Linux >= 5.3)
    except (AttributeError, OSError):
        handle = None

    def watch() -> None:
        while True:
            if handle is not None:
                select.select([handle], [], [])
            else:  # poll; a trainer that is a zombie still counts as alive until reaped
                time.sleep(2)
                try:
                    os.kill(trainer, 0)
                    continue
                except ProcessLookupError:
                    pass
            os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{trainer}", daemon=True).start()
