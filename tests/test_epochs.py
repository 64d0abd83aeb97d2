"""Finite epochs and class-aware batches of the training stream: ranks x workers partition each epoch exactly,
every rank gets the same number of batches however uneven the shards, epochs reshuffle deterministically,
a resumed stream continues exactly across an epoch boundary, and class-aware batches hold every class they
contain at least m + 1 times."""
import io
import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import REPO
from dist_helpers import free_port
from lacvit_dist.config import ConfigError, load_config
from lacvit_dist.data.pipeline import (BadSampleError, FiniteEpochError, _epoch_shards, finite_epoch_plan,
                                       train_loader)
from lacvit_dist.data.shards import SplitInfo, load_info
from lacvit_dist.data.transforms import ImageStats, MultiView, contrastive_view, evaluation

STATS = ImageStats(img_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLASSES = 4


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, (value * 7) % 256, (value * 13) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path, lengths: list[int], bad: set[str] = frozenset(),
                 bad_labels: set[str] = frozenset()) -> SplitInfo:
    """Shards of the given lengths; sample i of shard s has key s{s}_{i}, label (s + i) % CLASSES; keys in
    `bad` get bytes that are not an image, keys in `bad_labels` a label that is not a number."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for s, length in enumerate(lengths):
        names.append(str(root / f"train-{s:06d}.tar"))
        with wds.TarWriter(names[-1]) as sink:
            for i in range(length):
                key = f"s{s}_{i}"
                sink.write({"__key__": key, "png": b"broken" if key in bad else _png(31 * s + i),
                            "cls": b"x" if key in bad_labels else str((s + i) % CLASSES).encode()})
    return SplitInfo(name="train", filenames=tuple(names), shard_lengths=tuple(lengths))


def all_keys(split: SplitInfo) -> set[str]:
    return {f"s{s}_{i}" for s, length in enumerate(split.shard_lengths) for i in range(length)}


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> SplitInfo:
    return write_shards(tmp_path_factory.mktemp("even"), [12] * 8)


def finite(split, batch_size, *, rank, world_size, workers, start_batch=0, transform=None, seed=5, **kw):
    return train_loader(split, CLASSES, transform or evaluation(STATS), batch_size, seed=seed, num_workers=workers,
                        shuffle_buffer=10, start_batch=start_batch, epoch_mode="finite", rank=rank,
                        world_size=world_size, **kw)


def take(stream, n: int) -> list:
    return list(itertools.islice(stream, n))


def keys_of(batches) -> list[str]:
    return [k for batch in batches for k in batch.keys]


def test_two_ranks_two_workers_partition_every_epoch(even):
    """8 even shards, 2 ranks x 2 workers, batches of 4: every epoch gives every sample to exactly one rank;
    epochs reshuffle (another order, another deal of shards to ranks) and the same seed repeats them."""
    plan = finite_epoch_plan(even, 2, 2, 4)
    assert plan == (6, 12, 0)  # 2 shards x 12 samples per stream = 6 batches; nothing falls off
    per_rank = [keys_of(take(finite(even, 4, rank=rank, world_size=2, workers=2), 3 * 12)) for rank in (0, 1)]
    epochs = [[keys[e * 48:(e + 1) * 48] for keys in per_rank] for e in range(3)]
    for epoch in epochs:
        union = epoch[0] + epoch[1]
        assert len(union) == len(set(union)) and set(union) == all_keys(even)
    assert epochs[0][0] != epochs[1][0] and set(epochs[0][0]) != set(epochs[1][0])  # reshuffled and re-dealt
    again = keys_of(take(finite(even, 4, rank=0, world_size=2, workers=2), 2 * 12))
    assert again == per_rank[0][:2 * 48]
    other_seed = keys_of(take(finite(even, 4, rank=0, world_size=2, workers=2, seed=6), 12))
    assert other_seed != per_rank[0][:48]


def test_four_ranks_two_workers_partition_every_epoch(even):
    """The layout of the 2-node tests (4 ranks) with 2 workers each: 8 streams of one shard each."""
    plan = finite_epoch_plan(even, 4, 2, 4)
    per_rank = [keys_of(take(finite(even, 4, rank=rank, world_size=4, workers=2), 2 * plan.batches_per_rank))
                for rank in range(4)]
    share = plan.batches_per_rank * 4
    for epoch in range(2):
        union = [key for keys in per_rank for key in keys[epoch * share:(epoch + 1) * share]]
        assert len(union) == len(set(union)) and set(union) == all_keys(even)


def test_uneven_shards_give_every_rank_the_same_batches(tmp_path):
    """Shards of 11..5 samples: the plan cuts every stream to what its worst deal holds, so each rank's epoch
    window holds distinct samples of that epoch only, and no sample is given to two ranks in one epoch."""
    split = write_shards(tmp_path, [11, 9, 8, 7, 6, 5])
    plan = finite_epoch_plan(split, 2, 2, 2)
    assert plan == (2, 4, 46 - 2 * 2 * 2 * 2)  # the smallest shard (5) gives 2 batches of 2 to every stream
    epochs = 3
    per_rank = [keys_of(take(finite(split, 2, rank=rank, world_size=2, workers=2), epochs * plan.batches_per_rank))
                for rank in (0, 1)]
    window = plan.batches_per_rank * 2
    for e in range(epochs):
        both = [keys[e * window:(e + 1) * window] for keys in per_rank]
        assert all(len(keys) == window for keys in both)
        assert len(set(both[0] + both[1])) == 2 * window  # at most once per epoch, over both ranks


@pytest.mark.parametrize("world_size, workers, lengths", [(2, 2, [11, 9, 8, 7, 6, 5]), (3, 2, [9] * 7 + [2, 30]),
                                                          (2, 3, list(range(1, 14)))])
def test_plan_holds_for_every_epochs_deal(world_size, workers, lengths):
    """The planned batches fit the stream with the fewest samples in any epoch's deal of the shards."""
    split = SplitInfo("train", tuple(f"shard{i}" for i in range(len(lengths))), tuple(lengths))
    size = dict(zip(split.filenames, lengths))
    batch = 2
    plan = finite_epoch_plan(split, world_size, workers, batch)
    fewest = min(sum(size[s] for s in _epoch_shards(split.filenames, 0, epoch, rank, world_size, role, workers))
                 for epoch in range(200) for rank in range(world_size) for role in range(workers))
    assert plan.batches_per_stream * batch <= fewest
    assert plan.unused_samples == sum(lengths) - plan.batches_per_rank * batch * world_size


def test_deal_is_the_same_on_every_rank_and_covers_all_shards():
    files = tuple(f"shard{i}" for i in range(10))
    for epoch in range(5):
        dealt = [s for rank in range(2) for role in range(3) for s in _epoch_shards(files, 1, epoch, rank, 2, role, 3)]
        assert sorted(dealt) == sorted(files)
    assert _epoch_shards(files, 1, 0, 0, 2, 0, 3) != _epoch_shards(files, 1, 1, 0, 2, 0, 3)


def test_epoch_is_a_whole_number_of_optimizer_steps(even):
    assert finite_epoch_plan(even, 2, 2, 4, accumulation=8).batches_per_rank == 8  # not 12: 8 x 1 step
    for workers, accumulation in itertools.product((0, 1, 2, 3), (1, 2, 3, 4, 5)):
        assert finite_epoch_plan(even, 1, workers, 2, accumulation=accumulation).batches_per_rank % accumulation == 0


def test_fewer_shards_than_ranks_times_workers_is_a_clear_error(even):
    split = SplitInfo("train", even.filenames[:3], even.shard_lengths[:3])
    with pytest.raises(FiniteEpochError, match=r"split 'train' has 3 shards, fewer than 2 ranks x 2 data workers") \
            as err:
        finite(split, 4, rank=0, world_size=2, workers=2)
    assert "smaller shards" in str(err.value) and "resampled" in str(err.value)
    with pytest.raises(FiniteEpochError, match="less than 1 micro batch"):
        finite_epoch_plan(even, 2, 2, 32)


@pytest.mark.parametrize("workers, start", [(0, 11), (2, 10), (2, 21), (3, 8)])
def test_resume_across_an_epoch_boundary(even, workers, start):
    """A run resumed after `start` batches yields exactly what the uninterrupted run yields next, keys and
    augmented pixels, across the end of an epoch (and, from batch 21, after skipping a whole epoch)."""
    transform = MultiView(contrastive_view(ImageStats(8, (0.5,) * 3, (0.5,) * 3), 0.5, 0.4), views=2)
    per_rank = finite_epoch_plan(even, 2, workers, 4).batches_per_rank
    assert start // per_rank != (start + 5) // per_rank  # the six compared batches cross into the next epoch
    torch.manual_seed(0)
    uninterrupted = take(finite(even, 4, rank=1, world_size=2, workers=workers, transform=transform), start + 6)
    torch.manual_seed(99)
    resumed = take(finite(even, 4, rank=1, world_size=2, workers=workers, transform=transform, start_batch=start), 6)
    assert keys_of(resumed) == keys_of(uninterrupted[start:])
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, uninterrupted[start:]))


def test_bad_samples_never_shorten_an_epoch(tmp_path):
    """Two shards of 4, batches of 4: no slack. A bad sample makes the stream read its shards again to fill
    the epoch's batches (with a warning); with nothing good at all it stops with a clear error."""
    split = write_shards(tmp_path / "one_bad", [4, 4], bad={"s0_2"})
    with pytest.warns(UserWarning, match="second time"):
        batches = take(finite(split, 4, rank=0, world_size=1, workers=0), 4)
    assert [len(b.keys) for b in batches] == [4, 4, 4, 4]
    assert "s0_2" not in keys_of(batches) and batches[-1].stream.bad_samples["undecodable_image"] >= 1
    dead = write_shards(tmp_path / "all_bad", [4, 4], bad={f"s{s}_{i}" for s in (0, 1) for i in range(4)})
    with pytest.raises(FiniteEpochError, match="too many bad samples"), pytest.warns(UserWarning):
        take(finite(dead, 4, rank=0, world_size=1, workers=0), 1)
    with pytest.raises(BadSampleError, match="s0_2"):
        take(finite(split, 4, rank=0, world_size=1, workers=0, skip_bad_samples=False), 2)


def _bad_totals(batches) -> Counter:
    """Skipped samples over the streams, as the trainer adds them up: each stream's count at its latest batch."""
    latest = {b.stream.role: b.stream.bad_samples for b in batches}
    return sum((Counter(counts) for counts in latest.values()), Counter())


@pytest.mark.filterwarnings("ignore:skipped bad sample")
@pytest.mark.parametrize("mode, workers, m", [("resampled", 2, 0), ("finite", 2, 0), ("finite", 0, 0),
                                              ("resampled", 2, 1), ("finite", 2, 1)])
def test_resume_after_dropped_bad_samples_is_exact(tmp_path, mode, workers, m):
    """Bad samples dropped before the checkpoint move every later batch along its stream. A stream resumed
    from the positions the trainer kept (each stream's last batch's) yields exactly what the uninterrupted one
    yields next, keys and pixels, and the checkpoint's skipped-sample counts plus the resumed streams' equal
    the uninterrupted run's (the skipped part is re-read, not re-counted). Class-aware grouping (m = 1) meets
    the bad labels before the skip, plain batches after it."""
    split = write_shards(tmp_path, [13] * 8, bad={f"s{s}_3" for s in range(8)},
                         bad_labels={f"s{s}_{7 + s % 2}" for s in range(8)})
    start, more = 7, 6
    transform = MultiView(contrastive_view(STATS, 0.5, 0.4), views=2)

    def stream(start_batch=0, positions=None):
        return train_loader(split, CLASSES, transform, 4, seed=1, num_workers=workers, shuffle_buffer=10,
                            epoch_mode=mode, class_aware_m=m, start_batch=start_batch, rank=1, world_size=2,
                            positions=positions)

    uninterrupted = take(stream(), start + more)
    before = uninterrupted[:start]
    positions = {b.stream.role: b.stream.position for b in before}
    assert max(p.units for p in positions.values()) > start // max(1, workers) * 4 // (m + 1)  # bad units were read
    resumed = take(stream(start, positions), more)
    assert keys_of(resumed) == keys_of(uninterrupted[start:])
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, uninterrupted[start:]))
    assert _bad_totals(before) + _bad_totals(resumed) == _bad_totals(uninterrupted)
    assert _bad_totals(uninterrupted)["undecodable_image"] > 0 and _bad_totals(uninterrupted)["bad_label"] > 0


def _assert_class_aware(batches, m: int) -> None:
    for batch in batches:
        counts = Counter(batch.labels.tolist())
        assert min(counts.values()) >= m + 1, counts


@pytest.mark.parametrize("m, batch", [(1, 6), (2, 6)])
def test_class_aware_batches_in_both_modes(digits_root, even, m, batch):
    info = load_info(digits_root)
    resampled = take(train_loader(info.split("train"), info.num_classes, evaluation(STATS), batch, seed=0,
                                  num_workers=2, shuffle_buffer=50, class_aware_m=m), 20)
    _assert_class_aware(resampled, m)
    assert len({label for b in resampled for label in b.labels.tolist()}) == info.num_classes  # all classes drawn
    plan = finite_epoch_plan(even, 2, 2, batch, group_size=m + 1, num_classes=CLASSES)
    finite_batches = take(finite(even, batch, rank=0, world_size=2, workers=2, class_aware_m=m),
                          2 * plan.batches_per_rank)
    _assert_class_aware(finite_batches, m)
    for e in range(2):  # still at most once per epoch
        keys = keys_of(finite_batches[e * plan.batches_per_rank:(e + 1) * plan.batches_per_rank])
        assert len(keys) == len(set(keys))


def test_plain_batches_would_break_the_class_aware_check(digits_root):
    """The check above can fail: plain batches of 6 from 10 classes nearly always hold a class once."""
    info = load_info(digits_root)
    plain = take(train_loader(info.split("train"), info.num_classes, evaluation(STATS), 6, seed=0, num_workers=0,
                              shuffle_buffer=50), 5)
    with pytest.raises(AssertionError):
        _assert_class_aware(plain, 1)


@pytest.mark.parametrize("mode", ["resampled", "finite"])
def test_class_aware_stream_resumes_exactly(even, mode):
    def stream(start):
        return train_loader(even, CLASSES, evaluation(STATS), 4, seed=2, num_workers=2, shuffle_buffer=10,
                            epoch_mode=mode, class_aware_m=1, start_batch=start, rank=0, world_size=2)

    uninterrupted = keys_of(take(stream(0), 15))
    assert keys_of(take(stream(9), 6)) == uninterrupted[9 * 4:]


def test_class_aware_batch_size_must_be_a_multiple(even):
    with pytest.raises(ValueError, match="multiple of class_aware_m"):
        train_loader(even, CLASSES, evaluation(STATS), 5, seed=0, num_workers=0, shuffle_buffer=0, class_aware_m=1)


@pytest.mark.parametrize("overrides, message", [
    (["data.class_aware_m=2", "stage1.micro_batch_size=8"], "multiple of class_aware_m"),
    (["data.class_aware_m=-1"], "must be >= 0"),
    (["data.epoch_mode=finite", "stage1.steps_per_epoch=5"], "stage1.steps_per_epoch: must be null"),
    (["data.epoch_mode=once"], "data.epoch_mode"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_accepts_finite_class_aware():
    cfg = load_config(None, ["data.epoch_mode=finite", "data.class_aware_m=1", "stage1.micro_batch_size=8",
                             "data.allow_pipe_urls=true"])
    assert (cfg.data.epoch_mode, cfg.data.class_aware_m, cfg.data.allow_pipe_urls) == ("finite", 1, True)


def test_training_in_finite_class_aware_mode_two_ranks(digits_root, tmp_path):
    """torchrun, 2 ranks x 2 workers: a stage-1 epoch is exactly the plan's steps, and every rank gets there."""
    split = load_info(digits_root).split("train")
    steps = finite_epoch_plan(split, 2, 2, 32, accumulation=2, group_size=2, num_classes=10).batches_per_rank // 2
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "train.py"), "--config", str(REPO / "configs" / "demo_digits.yaml"), f"data.root={digits_root}",
           f"run.output_dir={tmp_path}", "run.name=finite", "run.stages=[stage1]", "model.overrides.embed_dim=32",
           "model.overrides.depth=1", "model.overrides.num_heads=2", "model.proj_dim=16", "data.num_workers=2",
           "data.epoch_mode=finite", "data.class_aware_m=1", "stage1.epochs=1", "stage1.micro_batch_size=32",
           "stage1.grad_accum_steps=2", "stage1.log_every_steps=1", "stage1.eval_every_epochs=100"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{steps} steps/epoch x 1 epochs" in proc.stdout and f"step {steps}/{steps}" in proc.stdout
    assert "finite epochs of split 'train'" in proc.stdout
