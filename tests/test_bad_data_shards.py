"""Bad data on the reading side: a tar cut short is found (counted in skip mode, an error naming split and shard
otherwise) instead of read silently as fewer samples; a skip-mode evaluation pass (the kNN bank) accounts for
every sample; the start-up check finds missing or empty splits and unusable shards before the first step."""
import io
import itertools
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from lacvit_dist.config import load_config
from lacvit_dist.data.checks import DataCheckError, check_data, shard_problem, tar_member_names
from lacvit_dist.data.pipeline import BadSampleError, eval_loader, train_loader
from lacvit_dist.data.shards import DatasetInfo, SplitInfo
from lacvit_dist.data.transforms import ImageStats, evaluation
from lacvit_dist.evaluation.passes import skipped_in_bank

STATS = ImageStats(img_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, n: int, bad: dict[int, dict] = {}) -> Path:  # noqa: B006 (read only)
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write(bad.get(i, {"__key__": f"{path.stem}_{i}", "png": _png(i), "cls": b"1"}))
    return path


def cut_between_members(path: Path, keep_samples: int) -> None:
    """Cut the tar right before sample `keep_samples`' first member: tarfile then stops without an error."""
    with tarfile.open(path) as tar:
        members = [m for m in tar if m.isreg()]
    offset = members[2 * keep_samples].offset  # two members (png, cls) per sample
    path.write_bytes(path.read_bytes()[:offset])


@pytest.fixture
def cut(tmp_path) -> SplitInfo:
    """A 'train' split of two 10-sample shards, the second cut after 4 samples (6 lost)."""
    good, short = write_shard(tmp_path / "train-000000.tar", 10), write_shard(tmp_path / "train-000001.tar", 10)
    cut_between_members(short, 4)
    return SplitInfo(name="train", filenames=(str(good), str(short)), shard_lengths=(10, 10))


def test_cut_tar_is_read_silently_by_tarfile(cut):
    """The failure mode itself: webdataset reads the cut shard as 4 samples and reports nothing."""
    errors = []
    samples = list(wds.tarfile_to_samples(handler=lambda e: errors.append(e) or True)(iter([{"url": cut.filenames[1]}])))
    assert len(samples) == 4 and errors == []


def test_cut_train_shard_counted_as_lost_samples_or_named(cut):
    stream = train_loader(cut, 10, evaluation(STATS), 2, seed=0, num_workers=0, shuffle_buffer=0,
                          epoch_mode="finite", rank=0, world_size=1)
    with pytest.warns(UserWarning, match=r"unreadable_tar.*train-000001\.tar.*read 4 of the 10"):
        batches = list(itertools.islice(stream, 8))  # the 14 samples of one pass, then the refill pass
    assert batches[-1].stream.bad_samples["unreadable_tar"] == 6  # counted in samples, like every kind
    strict = train_loader(cut, 10, evaluation(STATS), 2, seed=0, num_workers=0, shuffle_buffer=0,
                          epoch_mode="finite", rank=0, world_size=1, skip_bad_samples=False)
    with pytest.raises(BadSampleError, match=r"split 'train', shard .*train-000001\.tar: unreadable tar") as err:
        list(itertools.islice(strict, 8))
    assert err.value.kind == "unreadable_tar"


def test_cut_val_shard_is_an_error_naming_split_and_shard(cut):
    val = SplitInfo(name="val", filenames=cut.filenames, shard_lengths=cut.shard_lengths)
    with pytest.raises(BadSampleError, match=r"split 'val', shard .*train-000001\.tar: unreadable tar, read 4 of"):
        list(eval_loader(val, 10, evaluation(STATS), 4, rank=0, world_size=1, num_workers=0))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_mode_pass_accounts_for_every_sample(tmp_path, workers):
    """The kNN bank's read of train: bad samples and a cut shard's lost samples are skipped and counted, and
    embedded + skipped = the split's size; the same shards in strict mode stop at the first bad sample."""
    bad = {3: {"__key__": "b0", "png": b"not a png", "cls": b"1"}, 5: {"__key__": "b1", "png": _png(0)},
           9: {"__key__": "b2", "png": _png(0), "cls": b"12"}}
    first = write_shard(tmp_path / "train-000000.tar", 10, bad)
    second = write_shard(tmp_path / "train-000001.tar", 10)
    cut_between_members(second, 7)
    split = SplitInfo(name="train", filenames=(str(first), str(second)), shard_lengths=(10, 10))
    bank = eval_loader(split, 10, evaluation(STATS), 4, rank=0, world_size=1, num_workers=workers,
                       skip_bad_samples=True)
    keys = [k for _, _, batch_keys in bank for k in batch_keys]
    assert len(keys) == len(set(keys)) == 14
    assert bank.skipped == {"no_image": 0, "undecodable_image": 1, "bad_label": 1, "label_out_of_range": 1,
                            "unreadable_tar": 3}
    assert skipped_in_bank(bank.skipped, len(keys), 20, "bank") == bank.skipped
    with pytest.raises(RuntimeError, match="evaluation of split 'train' .kNN bank. embedded 13 samples and skipped 6"):
        skipped_in_bank(bank.skipped, 13, 20, "split 'train' (kNN bank)")
    with pytest.raises(BadSampleError, match="split 'train', shard .*key b0: cannot decode"):
        list(eval_loader(split, 10, evaluation(STATS), 4, rank=0, world_size=1, num_workers=0))


def test_shard_problem_reads_tar_headers_only(tmp_path):
    good = write_shard(tmp_path / "a-000000.tar", 6)
    with tarfile.open(good) as tar:  # webdataset's TarWriter writes PAX headers: names come from those
        assert tar_member_names(str(good)) == [m.name for m in tar if m.isreg()]
    assert shard_problem(str(good), 6) is None
    assert "holds 6 samples, _info.json lists 7" in shard_problem(str(good), 7)
    cut = write_shard(tmp_path / "b-000000.tar", 6)
    cut_between_members(cut, 3)
    assert "cut short" in shard_problem(str(cut), 6)
    halved = write_shard(tmp_path / "c-000000.tar", 6)
    halved.write_bytes(halved.read_bytes()[:halved.stat().st_size // 2 + 100])  # inside a member
    assert any(word in shard_problem(str(halved), 6) for word in ("cut short", "truncated"))
    junk = tmp_path / "d-000000.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    assert "not a readable tar" in shard_problem(str(junk), 6)
    assert "not a readable tar" in shard_problem(str(tmp_path / "missing.tar"), 6)


def _info(tmp_path: Path, **splits: tuple[Path, ...]) -> DatasetInfo:
    return DatasetInfo(root=str(tmp_path), name="t", class_names=tuple("abcdefghij"), splits={
        name: SplitInfo(name, tuple(map(str, paths)), tuple(6 for _ in paths)) for name, paths in splits.items()})


def test_startup_check_of_every_split_the_stages_read(tmp_path):
    train, val, test = (write_shard(tmp_path / f"{s}-000000.tar", 6) for s in ("train", "val", "test"))
    stage1 = load_config(None, ["run.stages=[stage1]"])
    both = load_config(None, ["run.stages=[stage1,stage2]"])
    assert check_data(both, _info(tmp_path, train=(train,), val=(val,), test=(test,))) == []
    # --val 0 shards: no val split. Named with the way out, before any step; null runs without it.
    no_val = _info(tmp_path, train=(train,), test=(test,))
    with pytest.raises(DataCheckError, match=r"data.val_split: .* has no split 'val'.*--val 0.*data.val_split=null"):
        check_data(stage1, no_val)
    assert check_data(load_config(None, ["run.stages=[stage1,stage2]", "data.val_split=null"]), no_val) == []
    # Stage 1 never reads test; stage 2 does, so a run with it needs the split at start-up.
    assert check_data(stage1, _info(tmp_path, train=(train,), val=(val,))) == []
    with pytest.raises(DataCheckError, match="data.test_split: .* has no split 'test'"):
        check_data(both, _info(tmp_path, train=(train,), val=(val,)))
    empty = _info(tmp_path, train=(train,), val=(), test=(test,))
    with pytest.raises(DataCheckError, match="data.val_split: split 'val' of data set .* is empty"):
        check_data(both, empty)
    # A cut shard: an error in val; in train a warning under skip (training counts it), an error under error.
    cut_between_members(val, 2)
    with pytest.raises(DataCheckError, match=r"data.val_split: split 'val', shard .*val-000000.tar: cut short"):
        check_data(both, _info(tmp_path, train=(train,), val=(val,), test=(test,)))
    warnings = check_data(both, _info(tmp_path, train=(val,), val=(train,), test=(test,)))
    assert len(warnings) == 1 and "data.train_split: split 'train', shard" in warnings[0]
    strict = load_config(None, ["run.stages=[stage1,stage2]", "data.on_bad_sample=error"])
    with pytest.raises(DataCheckError, match="data.train_split: split 'train'"):
        check_data(strict, _info(tmp_path, train=(val,), val=(train,), test=(test,)))
