"""Shard writing and reading: digits / ImageFolder round trips, the stratified split, overwrite
protection, `_info.json` validation, timm's WebDataset reader on our shards, and the CLI."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lacvit_dist.data import make_shards
from lacvit_dist.data.shard_writer import write_dataset
from lacvit_dist.data.shards import DatasetInfoError, encoded_samples, INFO_FILE, load_info, Sample, SplitInfo, SplitNotFoundError
from lacvit_dist.data.encoding import encode_array, encode_file
from lacvit_dist.data.sources import digits_source, image_folder_source
from lacvit_dist.data.splits import stratified_split

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def read_shards(urls: list[str]) -> list[dict]:
    """All samples of the given shards, in order, via webdataset's own reader (images decoded)."""
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    return list(ds)


def tar_members(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def tiny_png(value: int) -> bytes:
    return encode_array(np.full((4, 4), value, dtype=np.uint8), "png")


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


# ----------------------------------------------------------------------------------------------
# digits round trip
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return digits_source()


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory, digits):
    """Digits written with the library API: (root, info, split indices)."""
    class_names, images, labels = digits
    parts = stratified_split(labels, FRACTIONS, seed=0)
    splits = {s: [Sample(encode_array(images[i]), int(labels[i])) for i in idx] for s, idx in parts.items()}
    root = tmp_path_factory.mktemp("digits")
    info = write_dataset(root, "digits", class_names, splits, samples_per_shard=200, progress=False)
    return root, info, parts


def test_digits_source(digits):
    class_names, images, labels = digits
    assert class_names == [str(c) for c in range(10)]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 255  # 0..16 scaled to the full byte range
    assert set(np.unique(images).tolist()) <= {round(v * 255 / 16) for v in range(17)}  # rounded, not floored
    assert sorted(np.unique(labels)) == list(range(10))


def test_digits_round_trip(digits, digits_shards):
    _, images, labels = digits
    root, info, parts = digits_shards
    assert info.num_classes == 10 and info.class_names == tuple(str(c) for c in range(10))
    assert set(info.splits) == {"train", "val", "test"}
    for split, idx in parts.items():
        meta = info.split(split)
        assert meta.num_samples == len(idx)
        for url, length in zip(meta.filenames, meta.shard_lengths):
            assert len(read_shards([url])) == length  # per-shard counts in _info.json are right
        samples = read_shards(list(meta.filenames))
        assert [s["__key__"] for s in samples] == [f"{split}_{n:07d}" for n in range(len(idx))]
        assert [int(s["cls"]) for s in samples] == labels[idx].tolist()
        pixels = np.stack([np.asarray(s["png"].convert("L")) for s in samples])
        np.testing.assert_array_equal(pixels, images[idx])  # PNG is lossless
    # train has several shards (2 ranks x workers need them); all but the last are full
    assert len(info.split("train").filenames) == 7
    assert info.split("train").shard_lengths[:-1] == (200,) * 6


def test_digits_split_covers_all_once_and_is_stratified(digits, digits_shards):
    _, _, labels = digits
    _, _, parts = digits_shards
    everything = np.concatenate(list(parts.values()))
    assert len(everything) == len(set(everything.tolist())) == 1797  # disjoint, covering
    for split, frac in FRACTIONS.items():
        got = Counter(labels[parts[split]].tolist())
        for cls, n in Counter(labels.tolist()).items():
            assert abs(got[cls] - n * frac) <= 1, (split, cls, got[cls], n * frac)


def test_shard_members_are_key_png_cls(digits_shards):
    _, info, _ = digits_shards
    names = tar_members(info.split("val").filenames[0])
    assert names[:2] == ["val_0000000.cls", "val_0000000.png"]
    assert len(names) == 2 * info.split("val").num_samples


# ----------------------------------------------------------------------------------------------
# stratified split
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_stratified_split_properties(seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(7), rng.integers(1, 40, size=7))  # imbalanced, tiny classes
    fractions = {"a": 0.55, "b": 0.15, "c": 0.3}
    parts = stratified_split(labels, fractions, seed=seed)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(labels)))
    for name, frac in fractions.items():
        assert abs(len(parts[name]) - len(labels) * frac) < 1  # totals track the target too
        for cls in range(7):
            n = int((labels == cls).sum())
            assert abs(int((labels[parts[name]] == cls).sum()) - n * frac) <= 1


def test_stratified_split_is_deterministic_and_mixes_classes():
    labels = np.repeat(np.arange(5), 40)  # class-sorted, as ImageFolder gives them
    first = stratified_split(labels, FRACTIONS, seed=3)
    again = stratified_split(labels, FRACTIONS, seed=3)
    other = stratified_split(labels, FRACTIONS, seed=4)
    assert all(np.array_equal(first[s], again[s]) for s in FRACTIONS)
    assert not all(np.array_equal(first[s], other[s]) for s in FRACTIONS)
    assert len(set(labels[first["train"][:20]].tolist())) > 1  # shards are not one class each
    # which members of a class land in which split is random too, not the first 70% of each class
    first_class_train = np.sort(first["train"][labels[first["train"]] == 0])
    assert not np.array_equal(first_class_train, np.arange(len(first_class_train)))


@pytest.mark.parametrize("fractions", [{"train": 0.7, "val": 0.2}, {"train": 0.9, "val": 0.2},
                                       {"train": 1.2, "val": -0.2}, {}])
def test_stratified_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(np.zeros(10, dtype=int), fractions, seed=0)


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def image_tree(tmp_path):
    """Three classes whose directory names sort differently from their creation order; PNG, JPEG
    (upper-case suffix too), an RGBA PNG, and files that must be ignored."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    layout = {"zebra": ["a.png", "b.JPG", "c.jpeg", "d.png"],
              "Apple": ["x.png", "y.jpg", "z.png"],
              "mango": ["m1.png", "m2.PNG", "m3.jpg", "m4.png", "m5.png"]}
    for cls, files in layout.items():
        (root / cls).mkdir(parents=True)
        for fname in files:
            pixels = rng.integers(0, 256, size=(rng.integers(5, 12), rng.integers(5, 12), 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if fname == "d.png":
                image = image.convert("RGBA")
            image.save(root / cls / fname, format="JPEG" if fname.lower().endswith(("jpg", "jpeg")) else "PNG")
        (root / cls / "notes.txt").write_text("not an image")
        (root / cls / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    return root


def test_image_folder_source(image_tree):
    class_names, paths, labels = image_folder_source(image_tree)
    assert class_names == ["Apple", "mango", "zebra"]  # sorted (case-sensitive, like torchvision)
    assert [p.name for p in paths] == ["x.png", "y.jpg", "z.png", "m1.png", "m2.PNG", "m3.jpg",
                                       "m4.png", "m5.png", "a.png", "b.JPG", "c.jpeg", "d.png"]
    assert labels.tolist() == [0] * 3 + [1] * 5 + [2] * 4


def test_image_folder_errors(tmp_path, image_tree):
    with pytest.raises(FileNotFoundError, match="missing"):
        image_folder_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        image_folder_source(tmp_path / "empty")
    (image_tree / "kiwi").mkdir()
    (image_tree / "kiwi" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="kiwi"):
        image_folder_source(image_tree)


def test_encode_file_keeps_matching_bytes_and_converts_the_rest(image_tree):
    png, jpg, rgba = image_tree / "Apple" / "x.png", image_tree / "Apple" / "y.jpg", image_tree / "zebra" / "d.png"
    assert encode_file(png, "png") == png.read_bytes()
    assert encode_file(jpg, "jpg") == jpg.read_bytes()  # no second JPEG compression
    as_png = Image.open(io.BytesIO(encode_file(jpg, "png")))
    assert as_png.format == "PNG"
    np.testing.assert_array_equal(np.asarray(as_png), np.asarray(Image.open(jpg)))
    as_jpg = Image.open(io.BytesIO(encode_file(rgba, "jpg")))
    assert as_jpg.format == "JPEG" and as_jpg.mode == "RGB"
    broken = image_tree / "Apple" / "broken.png"
    broken.write_bytes(png.read_bytes()[:40])
    with pytest.raises(ValueError, match="broken.png"):
        encode_file(broken, "png")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_folder_round_trip_through_cli(tmp_path, image_tree, fmt, capsys):
    out = tmp_path / "out"
    argv = ["imagefolder", "--root", str(image_tree), "--out", str(out), "--val", "0.25", "--test", "0.25",
            "--seed", "1", "--samples-per-shard", "2", "--format", fmt, "--quiet"]
    assert make_shards.main(argv) == 0
    assert "3 classes" in capsys.readouterr().out
    info = load_info(out)
    assert info.name == "tree" and info.class_names == ("Apple", "mango", "zebra") and info.image_ext == fmt
    class_names, paths, labels = image_folder_source(image_tree)
    parts = stratified_split(labels, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=1)
    for split, idx in parts.items():
        samples = read_shards(list(info.split(split).filenames))
        assert [int(s["cls"]) for s in samples] == labels[idx].tolist()
        import webdataset as wds  # raw bytes this time: compare with the encoder's output exactly

        raw = list(wds.WebDataset(list(info.split(split).filenames), shardshuffle=False, empty_check=False))
        assert [s[fmt] for s in raw] == [encode_file(paths[i], fmt) for i in idx]
    assert sum(info.split(s).num_samples for s in info.splits) == len(paths)


# ----------------------------------------------------------------------------------------------
# writing: refusal, overwrite, failures
# ----------------------------------------------------------------------------------------------

def small_splits(n_train: int = 5) -> dict[str, list[Sample]]:
    return {"train": [Sample(tiny_png(i), i % 2) for i in range(n_train)], "val": [Sample(tiny_png(99), 1)]}


def test_refuses_existing_shards_or_info_and_keeps_them(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, "toy", ["a", "b"], small_splits(), samples_per_shard=2, progress=False)
    before = snapshot(root)
    with pytest.raises(FileExistsError, match=str(root)):
        write_dataset(root, "toy", ["a", "b"], small_splits(1), progress=False)
    assert snapshot(root) == before
    # a directory holding only a foreign tar, or only an info file, is refused as well
    for name in ("foreign.tar", INFO_FILE):
        other = tmp_path / name.replace(".", "_")
        other.mkdir()
        (other / name).write_bytes(b"keep me")
        with pytest.raises(FileExistsError, match=name):
            write_dataset(other, "toy", ["a", "b"], small_splits(), progress=False)
        assert [p.name for p in other.iterdir()] == [name] and (other / name).read_bytes() == b"keep me"


def test_overwrite_replaces_the_set_and_refuses_foreign_files(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, "toy", ["a", "b"], small_splits(5), samples_per_shard=2, progress=False)
    assert len(load_info(root).split("train").filenames) == 3
    root.chmod(0o750)
    # the new set replaces the whole folder: files that are not ours are refused, by name, and kept
    (root / "foreign.tar").write_bytes(b"not ours")
    (root / "README").write_text("notes")
    (root / "other-000000.tar").write_bytes(b"named like ours, but neither listed nor a split we write")
    before = snapshot(root)
    with pytest.raises(FileExistsError, match=r"not part of a shard set \(README, foreign.tar, other-000000.tar\)"):
        write_dataset(root, "toy2", ["a", "b"], small_splits(3), progress=False, overwrite=True)
    assert snapshot(root) == before
    for name in ("foreign.tar", "README", "other-000000.tar"):
        (root / name).unlink()
    info = write_dataset(root, "toy2", ["a", "b"], {"train": small_splits(3)["train"]},
                         samples_per_shard=10, progress=False, overwrite=True)
    assert info.name == "toy2" and set(info.splits) == {"train"} and info.split("train").num_samples == 3
    assert {p.name for p in root.iterdir()} == {INFO_FILE, "train-000000.tar"}  # old shards and val are gone
    assert root.stat().st_mode & 0o777 == 0o750  # the swapped-in folder keeps the old one's permissions
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no staging or old folder left beside it


def test_writes_into_an_existing_empty_folder(tmp_path):
    root = tmp_path / "ds"
    root.mkdir(mode=0o750)
    info = write_dataset(root, "toy", ["a", "b"], small_splits(), samples_per_shard=2, progress=False)
    assert info.split("train").num_samples == 5 and root.stat().st_mode & 0o777 == 0o750
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


class Interrupt(Exception):
    pass


def failing_after(n_good: int, error: BaseException):
    """Samples that fail after `n_good` good ones: a bad sample (ValueError) or a raised exception."""
    for i in range(n_good):
        yield Sample(tiny_png(i), i % 2)
    if isinstance(error, ValueError):
        yield Sample(b"not an image", 0)
    raise error


@pytest.mark.parametrize("error", [ValueError("not PNG"), Interrupt("injected"), KeyboardInterrupt()],
                         ids=["bad_sample", "exception", "ctrl_c"])
def test_failed_overwrite_keeps_the_previous_set(tmp_path, error):
    """A write that fails after several shards are done leaves the old set byte for byte, still readable."""
    root = tmp_path / "ds"
    write_dataset(root, "toy", ["a", "b"], small_splits(5), samples_per_shard=2, progress=False)
    before = snapshot(root)
    with pytest.raises(type(error)):
        write_dataset(root, "new", ["a", "b"], {"val": small_splits()["val"], "train": failing_after(7, error)},
                      samples_per_shard=2, progress=False, overwrite=True)
    assert snapshot(root) == before
    info = load_info(root)
    assert info.name == "toy" and len(read_shards(list(info.split("train").filenames))) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # the unfinished new set is gone too


def _exited_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_next_write_repairs_an_interrupted_swap(tmp_path):
    """A crash between the swap's two renames leaves the old set renamed aside and the new one unfinished or
    not yet renamed in: the next write renames the old one back and deletes the rest, saying so; a folder of a
    write that is still running is left alone."""
    root = tmp_path / "ds"
    write_dataset(root, "toy", ["a", "b"], small_splits(5), samples_per_shard=2, progress=False)
    before = snapshot(root)
    pid = _exited_pid()
    root.rename(tmp_path / f".ds.old-{pid}-0123abcd")
    (tmp_path / f".ds.partial-{pid}-89abcdef").mkdir()
    (tmp_path / f".ds.partial-{pid}-89abcdef" / "train-000000.tar").write_bytes(b"new, unfinished")
    running = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".ds.partial-{running.pid}-00000000"
        live.mkdir()
        with pytest.warns(UserWarning) as caught, pytest.raises(FileExistsError, match="already holds shards"):
            write_dataset(root, "toy", ["a", "b"], small_splits(), progress=False)  # no --overwrite: refused
    finally:
        running.kill()
        running.wait()
    messages = [str(w.message) for w in caught]
    assert any(f"restored {root} from .ds.old-{pid}-0123abcd" in m for m in messages), messages
    assert any(f"deleted {tmp_path}/.ds.partial-{pid}-89abcdef" in m for m in messages), messages
    assert any(f"{live} belongs to a write to {root} by process {running.pid}, which is still running" in m
               for m in messages), messages
    assert snapshot(root) == before and load_info(root).name == "toy"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "ds"]
    # an old set left after the swap (its deletion interrupted) is deleted by the next write
    live.rmdir()
    stale = tmp_path / f".ds.old-{_exited_pid()}-fedcba98"
    stale.mkdir()
    with pytest.warns(UserWarning, match=f"deleted {stale}"):
        write_dataset(root, "new", ["a", "b"], small_splits(1), progress=False, overwrite=True)
    assert load_info(root).name == "new" and [p.name for p in tmp_path.iterdir()] == ["ds"]


@pytest.mark.parametrize("bad_sample, message", [
    (Sample(tiny_png(0), 2), r"label 2 outside \[0, 2\)"),
    (Sample(tiny_png(0), -1), "outside"),
    (Sample(b"\xff\xd8\xff not a png", 0), "not PNG"),
    (Sample("text", 0), "bytes"),
    ((tiny_png(0),), "expected"),
])
def test_failed_write_leaves_nothing(tmp_path, bad_sample, message):
    samples = [Sample(tiny_png(i), 0) for i in range(5)] + [bad_sample]
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path / "ds", "toy", ["a", "b"], {"train": iter(samples)}, samples_per_shard=2,
                      progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output folder nor the unfinished set beside it


@pytest.mark.parametrize("kwargs, message", [
    ({"splits": {"train": []}}, "no samples"),
    ({"splits": {"tr-ain": [Sample(tiny_png(0), 0)]}}, "split name"),
    ({"class_names": ["a", "a"]}, "unique"),
    ({"samples_per_shard": 0}, "samples_per_shard"),
    ({"image_ext": "gif"}, "image_ext"),
])
def test_write_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"root": tmp_path / "ds", "name": "toy", "class_names": ["a", "b"],
            "splits": {"train": [Sample(tiny_png(0), 0)]}} | kwargs
    with pytest.raises(ValueError, match=message):
        write_dataset(**args, progress=False)
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").iterdir())  # nothing left behind


def test_streaming_generator_and_numpy_labels(tmp_path):
    labels = np.array([0, 1, 1, 0, 1], dtype=np.int64)
    gen = (Sample(tiny_png(i), labels[i]) for i in range(5))  # no len(): streamed
    info = write_dataset(tmp_path / "ds", "toy", ["a", "b"], {"train": gen}, samples_per_shard=2, progress=False)
    assert info.split("train").shard_lengths == (2, 2, 1)
    assert [int(s["cls"]) for s in read_shards(list(info.split("train").filenames))] == labels.tolist()


def test_writes_are_byte_reproducible(tmp_path):
    a = write_dataset(tmp_path / "a", "toy", ["a", "b"], small_splits(), samples_per_shard=2, progress=False)
    b = write_dataset(tmp_path / "b", "toy", ["a", "b"], small_splits(), samples_per_shard=2, progress=False)
    assert snapshot(Path(a.root)) == snapshot(Path(b.root))


# ----------------------------------------------------------------------------------------------
# load_info
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def toy_root(tmp_path) -> Path:
    root = tmp_path / "ds"
    write_dataset(root, "toy", ["a", "b"], small_splits(), samples_per_shard=2, progress=False)
    return root


def edit_info(root: Path, edit) -> None:
    raw = json.loads((root / INFO_FILE).read_text())
    edit(raw)
    (root / INFO_FILE).write_text(json.dumps(raw))


def test_load_info_resolves_absolute_paths(toy_root):
    info = load_info(toy_root)
    raw = json.loads((toy_root / INFO_FILE).read_text())
    assert raw["splits"]["train"]["filenames"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert raw["num_classes"] == 2 and raw["class_names"] == ["a", "b"]
    expected = tuple(str(toy_root.resolve() / f) for f in raw["splits"]["train"]["filenames"])
    assert info.split("train").filenames == expected
    assert info.split("train").shard_lengths == (2, 2, 1) and info.split("train").num_samples == 5
    assert info.num_classes == 2


def test_load_info_missing_file(tmp_path, toy_root):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / INFO_FILE)):
        load_info(tmp_path)
    (toy_root / INFO_FILE).unlink()  # shards without info: an unfinished write
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_info(toy_root)


def test_load_info_malformed_json(toy_root):
    (toy_root / INFO_FILE).write_text('{"name": "toy", ')
    with pytest.raises(DatasetInfoError, match=f"{toy_root / INFO_FILE}.*not valid JSON"):
        load_info(toy_root)


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.pop("splits"), "missing key 'splits'"),
    (lambda raw: raw.pop("class_names"), "missing key 'class_names'"),
    (lambda raw: raw["splits"]["val"].pop("shard_lengths"), r"missing key 'splits'.'val'.'shard_lengths'"),
    (lambda raw: raw["splits"]["train"].update(num_samples=7), "num_samples 7"),
    (lambda raw: raw.update(num_classes=3), "num_classes"),
])
def test_load_info_bad_keys(toy_root, edit, message):
    edit_info(toy_root, edit)
    with pytest.raises(DatasetInfoError, match=message) as err:
        load_info(toy_root)
    assert INFO_FILE in str(err.value)


def test_load_info_missing_shard(toy_root):
    (toy_root / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="train-000001.tar"):
        load_info(toy_root)


def test_pipe_urls_refused_unless_allowed(toy_root, tmp_path):
    """A pipe: shard name is a shell command to webdataset: refused (naming split and shard) by default; with
    allow_pipe_urls it is kept verbatim and webdataset really runs it when the shard is read."""
    marker = tmp_path / "shell_ran"
    url = f"pipe:touch {marker} && cat {toy_root.resolve() / 'train-000001.tar'}"
    edit_info(toy_root, lambda raw: raw["splits"]["train"]["filenames"].__setitem__(1, url))
    with pytest.raises(DatasetInfoError, match=r"split 'train' lists shard 'pipe:touch .*allow_pipe_urls=true"):
        load_info(toy_root)
    info = load_info(toy_root, allow_pipe_urls=True)
    assert info.split("train").filenames[1] == url and not marker.exists()  # loading the info runs nothing
    keys = [s["__key__"] for s in read_shards(list(info.split("train").filenames))]
    assert keys == [f"train_{n:07d}" for n in range(5)] and marker.exists()


def test_pipe_root_refused(tmp_path):
    with pytest.raises(DatasetInfoError, match=r"data root 'pipe:cat x' is a webdataset pipe: URL"):
        load_info("pipe:cat x")


def test_unknown_split_names_root_and_splits(toy_root):
    with pytest.raises(SplitNotFoundError, match=r"no split 'test'.*\['train', 'val'\]") as err:
        load_info(toy_root).split("test")
    assert str(toy_root.resolve()) in str(err.value) and isinstance(err.value, KeyError)


# ----------------------------------------------------------------------------------------------
# timm reads our shards unchanged
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val"])
def test_timm_wds_reader_reads_our_shards(digits, digits_shards, split):
    from timm.data import create_dataset

    _, _, labels = digits
    root, info, parts = digits_shards
    ds = create_dataset("wds/digits", root=str(root), split=split, is_training=False)
    items = list(ds)
    assert len(items) == info.split(split).num_samples
    assert [target for _, target in items] == labels[parts[split]].tolist()  # shard order, no shuffle
    assert items[0][0].size == (8, 8) and items[0][0].mode == "RGB"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def test_cli_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "digits"
    assert make_shards.main(["digits", "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "10 classes" in stdout and "train" in stdout
    info = load_info(out)
    assert {s: info.split(s).num_samples for s in info.splits} == {"train": 1258, "val": 180, "test": 359}
    assert len(info.split("train").filenames) == 7  # 200 per shard by default
    # the CLI's split is the library's documented split for seed 0
    parts = stratified_split(digits_source()[2], FRACTIONS, seed=0)
    labels = digits_source()[2]
    assert [int(s["cls"]) for s in read_shards(list(info.split("test").filenames))] == labels[parts["test"]].tolist()
    # a second run into the same directory is refused (exit 2), --overwrite succeeds
    assert make_shards.main(["digits", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert make_shards.main(["digits", "--out", str(out), "--quiet", "--overwrite", "--test", "0"]) == 0
    assert set(load_info(out).splits) == {"train", "val"}


@pytest.mark.parametrize("argv", [
    ["digits", "--val", "0.6", "--test", "0.5"],
    ["digits", "--val", "-0.1"],
    ["digits", "--samples-per-shard", "0"],
    ["imagefolder", "--root", "/nonexistent/lacvit"],
])
def test_cli_user_errors_return_2_with_one_line(tmp_path, capsys, argv):
    assert make_shards.main(argv + ["--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lacvit-make-shards: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / INFO_FILE).exists()


def test_cli_usage_errors_return_2(capsys):
    assert make_shards.main(["cifar", "--out", "x"]) == 2
    assert make_shards.main(["digits"]) == 2  # --out is required
    assert "usage:" in capsys.readouterr().err


def test_encoded_samples_reads_bytes_and_labels_and_names_a_bad_sample(tmp_path):
    import webdataset as wds

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "a", "png": png.getvalue(), "cls": b"3"})
        sink.write({"__key__": "b", "png": png.getvalue()})  # no label
    split = SplitInfo(name="train", filenames=(str(shard),), shard_lengths=(2,))
    samples = encoded_samples(split, "png")
    assert next(samples) == (png.getvalue(), 3)
    with pytest.raises(ValueError, match=r"train-000000.tar, key b: expected .png and .cls members"):
        next(samples)
