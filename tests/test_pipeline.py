"""The WebDataset pipelines: evaluation sees every sample exactly once across ranks and workers, training
streams full, deterministic, per-rank batches, and bad samples are named by shard and key."""
import itertools

import pytest
import torch
import webdataset as wds
from dist_helpers import run_in_processes

from lacvit_dist.data.pipeline import BadSampleError, eval_loader, train_loader
from lacvit_dist.data.shards import SplitInfo, load_info
from lacvit_dist.data.transforms import ImageStats, MultiView, contrastive_view, evaluation

STATS = ImageStats(img_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _eval_keys(rank, world_size, root, workers):
    info = load_info(root)
    keys, labels = [], []
    for images, batch_labels, batch_keys in eval_loader(info.split("test"), info.num_classes, evaluation(STATS), 32,
                                                        rank=rank, world_size=world_size, num_workers=workers):
        assert images.shape[1:] == (3, 16, 16)
        keys += batch_keys
        labels += batch_labels.tolist()
    return keys, labels


def test_eval_sees_every_sample_once(digits_root, world_size=2, workers=2):
    info = load_info(digits_root)
    split = info.split("test")
    assert split.num_samples % 32 and split.num_samples % world_size  # the uneven case is the one that matters
    results = run_in_processes(_eval_keys, world_size, str(digits_root), workers)
    keys = [k for rank_keys, _ in results for k in rank_keys]
    assert len(keys) == split.num_samples == len(set(keys))
    reference = {s["__key__"]: int(s["cls"]) for s in wds.WebDataset(list(split.filenames), shardshuffle=False)}
    assert set(keys) == set(reference)
    for rank_keys, rank_labels in results:
        assert all(reference[k] == label for k, label in zip(rank_keys, rank_labels))
    sizes = [len(rank_keys) for rank_keys, _ in results]
    assert max(sizes) - min(sizes) <= workers  # balanced to within one sample per worker


def test_train_stream_full_batches_deterministic_and_per_rank(digits_root, monkeypatch):
    info = load_info(digits_root)
    split = info.split("train")
    transform = MultiView(contrastive_view(STATS, 0.5, 0.4, hflip=False), views=2)

    def take(rank, seed, n=6):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        torch.manual_seed(seed)
        stream = train_loader(split, info.num_classes, transform, 16, seed=seed, num_workers=0, shuffle_buffer=50)
        return list(itertools.islice(stream, n))

    first = take(0, seed=1)
    for images, labels, keys, _ in first:
        assert images.shape == (16, 2, 3, 16, 16) and labels.shape == (16,)
        assert labels.min() >= 0 and labels.max() < info.num_classes
        assert not torch.equal(images[:, 0], images[:, 1])  # two independent augmentations
    again = take(0, seed=1)
    assert [b[2] for b in first] == [b[2] for b in again]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert [b[2] for b in take(1, seed=1)] != [b[2] for b in first]  # each rank its own stream
    assert [b[2] for b in take(0, seed=2)] != [b[2] for b in first]


@pytest.mark.parametrize("workers, start", [(0, 5), (2, 5), (2, 6), (3, 4)])
def test_resumed_stream_continues_exactly(digits_root, monkeypatch, workers, start):
    """After `start` batches, a new loader with start_batch=start yields exactly what the uninterrupted
    stream yields next: same keys, same augmented pixels (per-sample augmentation seeds)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    info = load_info(digits_root)
    transform = MultiView(contrastive_view(STATS, 0.5, 0.4, hflip=True), views=2)

    def stream(start_batch):
        return train_loader(info.split("train"), info.num_classes, transform, 8, seed=3, num_workers=workers,
                            shuffle_buffer=40, start_batch=start_batch)

    torch.manual_seed(0)
    uninterrupted = list(itertools.islice(stream(0), start + 4))[start:]
    torch.manual_seed(123)  # the main process RNG differs after a restart; the data must not care
    resumed = list(itertools.islice(stream(start), 4))
    assert [b[2] for b in resumed] == [b[2] for b in uninterrupted]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, uninterrupted))


def _write_bad(path, sample):
    with wds.TarWriter(str(path)) as sink:
        sink.write(sample)


@pytest.mark.parametrize("sample, message", [
    ({"__key__": "k1", "png": b"not a png", "cls": b"1"}, "cannot decode"),
    ({"__key__": "k2", "cls": b"1", "txt": b"x"}, "no image"),
    ({"__key__": "k3", "png": "PNG", "cls": b"x"}, "not an integer"),
    ({"__key__": "k4", "png": "PNG", "cls": b"12"}, "outside"),
])
def test_bad_samples_named_by_shard_and_key(tmp_path, sample, message):
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    sample = {k: (buffer.getvalue() if v == "PNG" else v) for k, v in sample.items()}
    shard = tmp_path / "bad-000000.tar"
    _write_bad(shard, sample)
    split = SplitInfo(name="bad", filenames=(str(shard),), shard_lengths=(1,))
    loader = eval_loader(split, 10, evaluation(STATS), 4, rank=0, world_size=1, num_workers=0)
    with pytest.raises(BadSampleError) as err:
        list(loader)
    text = str(err.value)
    assert sample["__key__"] in text and message in text and str(shard) in text


def _png(value: int = 0) -> bytes:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_training_skips_and_counts_each_bad_kind(tmp_path):
    """Training skips bad samples and counts them per kind (a truncated tar too); strict mode raises."""
    good = [{"__key__": f"g{i}", "png": _png(i), "cls": b"1"} for i in range(6)]
    bad = [{"__key__": "b1", "png": b"not a png", "cls": b"1"}, {"__key__": "b2", "cls": b"1", "txt": b"x"},
           {"__key__": "b3", "png": _png(), "cls": b"x"}, {"__key__": "b4", "png": _png(), "cls": b"12"}]
    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for sample in good[:3] + bad + good[3:]:
            sink.write(sample)
    truncated = tmp_path / "train-000001.tar"
    data = shard.read_bytes()
    truncated.write_bytes(data[:len(data) // 2 + 100])  # cut inside a member
    transform = evaluation(STATS)

    split = SplitInfo(name="train", filenames=(str(shard),), shard_lengths=(10,))
    batches = list(itertools.islice(train_loader(split, 10, transform, 3, seed=0, num_workers=0, shuffle_buffer=0), 4))
    assert {k for b in batches for k in b.keys} <= {s["__key__"] for s in good}
    role, counts = batches[-1].stream.role, batches[-1].stream.bad_samples
    assert role == 0 and counts["undecodable_image"] >= 1 and counts["no_image"] >= 1
    assert counts["bad_label"] >= 1 and counts["label_out_of_range"] >= 1
    assert counts["undecodable_image"] == counts["no_image"] == counts["bad_label"] == counts["label_out_of_range"]

    both = SplitInfo(name="train", filenames=(str(truncated),), shard_lengths=(10,))
    with pytest.warns(UserWarning, match="unreadable_tar"):
        batch = list(itertools.islice(train_loader(both, 10, transform, 2, seed=0, num_workers=0,
                                                   shuffle_buffer=0), 6))[-1]
    assert batch.stream.bad_samples["unreadable_tar"] >= 1

    strict = train_loader(split, 10, transform, 3, seed=0, num_workers=0, shuffle_buffer=0, skip_bad_samples=False)
    with pytest.raises(BadSampleError, match=f"shard {shard}, key b1: cannot decode"):
        list(itertools.islice(strict, 4))
