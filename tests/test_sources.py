"""The official-split sources (CIFAR-10/100, CUB-200-2011, Oxford-IIIT Pet, Oxford 102 Flowers) from
small synthetic files in the official layouts, and the writer's options (workers, shuffle, downscaling,
JPEG quality, shard size)."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lacvit_dist.data import make_shards
from lacvit_dist.data.shards import INFO_FILE, load_info
from lacvit_dist.data.encoding import encode_file
from lacvit_dist.data.sources import cifar, cub, flowers, pets, SourceError


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def read_split(root: Path, split: str) -> list[tuple[str, bytes, int]]:
    """(key, raw image bytes, label) of every sample of a split, in shard order, read with tarfile."""
    info = load_info(root)
    out = []
    for url in info.split(split).filenames:
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        keys = sorted({name.split(".")[0] for name in members})
        out += [(k, members[f"{k}.{info.image_ext}"], int(members[f"{k}.cls"])) for k in keys]
    return out


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def make(argv: list[str]) -> int:
    return make_shards.main(argv + ["--quiet"])


def save_image(path: Path, rng, size=(12, 9), fmt="JPEG") -> bytes:
    """A random RGB image saved as `fmt`; returns the file bytes (unique per file: random pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ----------------------------------------------------------------------------------------------

def cifar_files(variant: str, rng) -> tuple[dict[str, bytes], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Python-2-style pickles (bytes keys) as the official archive holds them: 5 x 4 train images
    (CIFAR-10) or 20 train (CIFAR-100), 6 test images, labels 0..3 (5 train images per class)."""
    train = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    train_labels = np.repeat(np.arange(4), 5)[rng.permutation(20)]
    test_labels = np.array([3, 0, 1, 2, 2, 0])
    dump = lambda obj: pickle.dumps(obj, protocol=2)  # noqa: E731
    if variant == "cifar10":
        files = {f"data_batch_{b + 1}": dump({b"batch_label": b"x", b"data": train[4 * b:4 * b + 4],
                                              b"labels": train_labels[4 * b:4 * b + 4].tolist(),
                                              b"filenames": [b"f.png"] * 4}) for b in range(5)}
        files["test_batch"] = dump({b"data": test, b"labels": test_labels.tolist()})
        files["batches.meta"] = dump({b"label_names": [f"c10_{i}".encode() for i in range(10)],
                                      b"num_cases_per_batch": 4})
    else:  # coarse labels differ from the fine ones, so using the wrong key would show
        files = {"train": dump({b"data": train, b"fine_labels": train_labels.tolist(),
                                b"coarse_labels": [19] * 20}),
                 "test": dump({b"data": test, b"fine_labels": test_labels.tolist(), b"coarse_labels": [19] * 6}),
                 "meta": dump({b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
                               b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]})}
    return files, train, train_labels, test, test_labels


def write_cifar(tmp_path: Path, variant: str, files: dict[str, bytes]) -> tuple[Path, Path]:
    """The extracted folder and the .tar.gz (with the official folder name inside)."""
    folder_name = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[variant]
    archive_name = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[variant]
    folder = tmp_path / "extracted" / folder_name
    folder.mkdir(parents=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    archive = tmp_path / archive_name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder_name)
    return folder, archive


def as_hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_tarball_and_folder(tmp_path, variant):
    files, train, train_labels, test, test_labels = cifar_files(variant, np.random.default_rng(0))
    folder, archive = write_cifar(tmp_path, variant, files)
    outs = {}
    for kind, root in (("tar", archive), ("folder", folder), ("parent", archive.parent)):
        outs[kind] = tmp_path / f"out_{kind}"
        assert make([variant, "--root", str(root), "--out", str(outs[kind]), "--val", "0.2",
                     "--samples-per-shard", "5"]) == 0
    # the archive (read in memory), the extracted folder and a directory holding the archive agree
    assert snapshot(outs["tar"]) == snapshot(outs["folder"]) == snapshot(outs["parent"])
    assert not any(p.name.startswith("cifar") and p.is_dir() for p in archive.parent.iterdir()
                   if p.name not in ("extracted",)), "nothing may be extracted next to the archive"
    info = load_info(outs["tar"])
    prefix = "c10_" if variant == "cifar10" else "fine_"
    assert info.name == variant and info.class_names == tuple(f"{prefix}{i}" for i in range(info.num_classes))
    assert info.num_classes == (10 if variant == "cifar10" else 100)
    counts = {s: info.split(s).num_samples for s in info.splits}
    assert counts == {"train": 16, "val": 4, "test": 6}
    # test: the official test batch, in order, pixel for pixel (PNG is lossless; CHW rows -> HWC)
    got_test = read_split(outs["tar"], "test")
    assert [label for _, _, label in got_test] == test_labels.tolist()
    np.testing.assert_array_equal(np.stack([np.asarray(decode(b)) for _, b, _ in got_test]), as_hwc(test))
    # train + val: exactly the official train images with their labels; val is stratified (1 per class)
    train_px = {as_hwc(train)[i].tobytes(): int(train_labels[i]) for i in range(20)}
    seen = []
    for split in ("train", "val"):
        for _, data, label in read_split(outs["tar"], split):
            px = np.asarray(decode(data)).tobytes()
            assert train_px[px] == label
            seen.append(px)
    assert sorted(seen) == sorted(train_px)
    assert Counter(label for _, _, label in read_split(outs["tar"], "val")) == {0: 1, 1: 1, 2: 1, 3: 1}


def test_cifar_errors(tmp_path):
    files, *_ = cifar_files("cifar10", np.random.default_rng(0))
    del files["data_batch_3"]
    folder, archive = write_cifar(tmp_path, "cifar10", files)
    for root in (folder, archive):
        with pytest.raises(SourceError, match="data_batch_3"):
            cifar(root, "cifar10")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(SourceError, match=r"data_batch_3.*not a readable pickle"):
        cifar(folder, "cifar10")
    with pytest.raises(SourceError, match="does not exist"):
        cifar(tmp_path / "nope.tar.gz", "cifar10")


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


@pytest.fixture()
def cub_root(tmp_path):
    """3 classes x 5 images (ids 1..15, listed out of order); per class 3 official train, 2 test.
    Returns (root, {file bytes: (0-based label, is_train)})."""
    rng = np.random.default_rng(1)
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    lines = {"images": [], "split": [], "labels": []}
    truth = {}
    for image_id in range(1, 16):
        cls = (image_id - 1) % 3
        is_train = image_id <= 9
        rel = f"{CUB_CLASSES[cls]}/{CUB_CLASSES[cls][4:]}_{image_id:04d}_{image_id}.jpg"
        data = save_image(root / "images" / rel, rng, size=(10 + image_id, 8))
        truth[data] = (cls, is_train)
        lines["images"].append(f"{image_id} {rel}")
        lines["split"].append(f"{image_id} {int(is_train)}")
        lines["labels"].append(f"{image_id} {cls + 1}")
    order = rng.permutation(15)
    for key, fname in (("images", "images.txt"), ("split", "train_test_split.txt"),
                       ("labels", "image_class_labels.txt")):
        (root / fname).write_text("\n".join(lines[key][i] for i in order) + "\n")
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CUB_CLASSES)))
    return root, truth


def test_cub_official_split(tmp_path, cub_root):
    root, truth = cub_root
    out = tmp_path / "out"
    # --val 0.34 of the 9 official train images: 1 per class; the parent directory works as --root too
    assert make(["cub", "--root", str(root.parent), "--out", str(out), "--format", "jpg", "--val", "0.34"]) == 0
    info = load_info(out)
    assert info.name == "cub200"
    assert info.class_names == ("Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross")
    assert {s: info.split(s).num_samples for s in info.splits} == {"train": 6, "val": 3, "test": 6}
    got = {s: read_split(out, s) for s in info.splits}
    for split, samples in got.items():
        for _, data, label in samples:  # jpg -> jpg: the original bytes, so they identify the file
            cls, is_train = truth[data]
            assert label == cls
            assert is_train == (split != "test"), f"official {'train' if is_train else 'test'} image in {split}"
    assert Counter(label for _, _, label in got["val"]) == {0: 1, 1: 1, 2: 1}
    assert len({d for s in got.values() for _, d, _ in s}) == 15
    # the official test items, in id order (ids 10..15)
    assert [label for _, _, label in got["test"]] == [(i - 1) % 3 for i in range(10, 16)]
    assert json.loads((out / INFO_FILE).read_text())["source"]["split"] == "official train_test_split.txt"


def test_cub_errors_name_file_and_line(cub_root):
    root, _ = cub_root
    images = (root / "images.txt").read_text().splitlines()
    victim = images[4].split()[1]
    (root / "images" / victim).unlink()
    with pytest.raises(SourceError, match=rf"{victim}.*images.txt:5 does not exist"):
        cub(root)
    (root / "images.txt").write_text("\n".join(images[:2] + ["3"] + images[3:]) + "\n")
    with pytest.raises(SourceError, match=r"images.txt:3: expected 2 fields"):
        cub(root)
    (root / "images.txt").write_text("\n".join(images) + "\n")
    split = (root / "train_test_split.txt").read_text().splitlines()
    split[6] = split[6].split()[0] + " 2"
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    with pytest.raises(SourceError, match=r"train_test_split.txt:7: train flag 2 outside"):
        cub(root)
    (root / "train_test_split.txt").write_text("\n".join(split[1:]) + "\n")
    with pytest.raises(SourceError, match=r"train_test_split.txt has no line for image id"):
        cub(root)
    (root / "classes.txt").unlink()
    with pytest.raises(SourceError, match="missing CUB classes file .*classes.txt"):
        cub(root)


# ----------------------------------------------------------------------------------------------
# Oxford-IIIT Pet
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def pets_root(tmp_path):
    """3 breeds (cat, dog, two-word cat); trainval 2 per class, test 2 per class."""
    rng = np.random.default_rng(2)
    root = tmp_path / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("Egyptian_Mau", 1)]
    truth = {}
    for list_name, numbers in (("trainval.txt", (1, 2)), ("test.txt", (3, 4))):
        lines = []
        for class_id, (breed, species) in enumerate(breeds, 1):
            for n in numbers:
                image = f"{breed}_{n * 10 + class_id}"
                data = save_image(root / "images" / f"{image}.jpg", rng)
                truth[data] = (class_id - 1, list_name == "trainval.txt")
                lines.append(f"{image} {class_id} {species} {class_id}")
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / list_name).write_text("\n".join(lines) + "\n")
    return root, truth


def test_pets_official_split(tmp_path, pets_root):
    root, truth = pets_root
    out = tmp_path / "out"
    assert make(["pets", "--root", str(root), "--out", str(out), "--format", "jpg", "--val", "0"]) == 0
    info = load_info(out)
    assert info.class_names == ("Abyssinian", "american_bulldog", "Egyptian_Mau")
    assert {s: info.split(s).num_samples for s in info.splits} == {"train": 6, "test": 6}
    for split in ("train", "test"):
        for _, data, label in read_split(out, split):
            assert truth[data] == (label, split == "train")


def test_pets_errors(pets_root):
    root, _ = pets_root
    lines = (root / "annotations" / "test.txt").read_text().splitlines()
    name = lines[1].split()[0]
    lines[1] = f"{name} 3 1 3"  # an Abyssinian image under class 3 (Egyptian_Mau)
    (root / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"test.txt:2: class id 3 is 'Abyssinian' here but 'Egyptian_Mau'"):
        pets(root)
    lines[1] = f"{name} x 1 1"
    (root / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"test.txt:2: class id 'x' is not an integer"):
        pets(root)
    (root / "annotations" / "trainval.txt").unlink()
    with pytest.raises(SourceError, match="trainval.txt"):
        pets(root)


# ----------------------------------------------------------------------------------------------
# Oxford 102 Flowers
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def flowers_root(tmp_path):
    """12 images, 3 classes (labels 1..3); official trnid/valid 1 per class, tstid the other 6."""
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    root = tmp_path / "flowers102"
    labels = np.array([1, 2, 3] * 4)
    truth = {}
    for i in range(1, 13):
        truth[save_image(root / "jpg" / f"image_{i:05d}.jpg", rng)] = int(labels[i - 1]) - 1
    savemat(root / "imagelabels.mat", {"labels": labels[None, :].astype(np.uint8)})
    ids = {"trnid": np.array([[4, 2, 9]]), "valid": np.array([[1, 5, 6]]), "tstid": np.array([[3, 7, 8, 10, 11, 12]])}
    savemat(root / "setid.mat", {k: v.astype(np.uint16) for k, v in ids.items()})
    return root, truth, ids


def test_flowers_official_split(tmp_path, flowers_root):
    root, truth, ids = flowers_root
    out = tmp_path / "out"
    assert make(["flowers", "--root", str(root), "--out", str(out), "--format", "jpg"]) == 0
    info = load_info(out)
    assert info.class_names == ("001", "002", "003")
    file_bytes = {i: (root / "jpg" / f"image_{i:05d}.jpg").read_bytes() for i in range(1, 13)}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        got = read_split(out, split)
        expected = sorted(file_bytes[i] for i in ids[key].ravel())
        assert sorted(d for _, d, _ in got) == expected
        assert all(truth[d] == label for _, d, label in got)
    # val and test keep the official order
    assert [d for _, d, _ in read_split(out, "test")] == [file_bytes[i] for i in ids["tstid"].ravel()]


def test_flowers_errors(tmp_path, flowers_root, capsys):
    from scipy.io import savemat

    root, _, ids = flowers_root
    assert make(["flowers", "--root", str(root), "--out", str(tmp_path / "o")]) == 0
    # --val does not exist for flowers: the official val split is used
    assert make(["flowers", "--root", str(root), "--out", str(tmp_path / "o2"), "--val", "0.1"]) == 2
    savemat(root / "setid.mat", {"trnid": ids["trnid"], "valid": ids["valid"], "tstid": np.array([[3, 4, 99]])})
    with pytest.raises(SourceError, match=r"setid.mat: 'tstid' holds image id 99"):
        flowers(root)
    savemat(root / "setid.mat", {"trnid": ids["trnid"], "valid": ids["valid"], "tstid": np.array([[3, 4]])})
    with pytest.raises(SourceError, match=r"image id 4 is in both 'trnid' and 'tstid'"):
        flowers(root)
    savemat(root / "setid.mat", {"trnid": ids["trnid"], "valid": ids["valid"]})
    with pytest.raises(SourceError, match=r"setid.mat: missing variable 'tstid'"):
        flowers(root)
    savemat(root / "setid.mat", ids)
    (root / "jpg" / "image_00007.jpg").unlink()
    with pytest.raises(SourceError, match=r"image_00007.jpg listed at .*setid.mat \(image id 7\)"):
        flowers(root)


# ----------------------------------------------------------------------------------------------
# writer options
# ----------------------------------------------------------------------------------------------

def test_workers_give_identical_shards(tmp_path, cub_root):
    root, _ = cub_root
    common = ["cub", "--root", str(root), "--format", "png", "--max-side", "12", "--samples-per-shard", "2"]
    assert make(common + ["--out", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert make(common + ["--out", str(tmp_path / "w2"), "--workers", "2"]) == 0
    assert snapshot(tmp_path / "w1") == snapshot(tmp_path / "w2")
    assert len(load_info(tmp_path / "w1").split("train").filenames) > 2


def test_shuffle_and_no_shuffle(tmp_path, cub_root):
    root, truth = cub_root
    orders = {}
    for flag, seed in (("--shuffle", "0"), ("--shuffle", "1"), ("--no-shuffle", "0")):
        out = tmp_path / f"{flag}{seed}"
        assert make(["cub", "--root", str(root), "--out", str(out), "--format", "jpg", "--val", "0",
                     flag, "--seed", seed]) == 0
        orders[flag + seed] = [d for _, d, _ in read_split(out, "train")]
        assert [d for _, d, _ in read_split(out, "test")] == sorted(
            (d for d, (_, tr) in truth.items() if not tr), key=lambda d: list(truth).index(d))
    # no shuffle: official id order; shuffles: a seeded permutation of the same images
    assert orders["--no-shuffle0"] == [d for d, (_, tr) in truth.items() if tr]
    assert sorted(orders["--shuffle0"]) == sorted(orders["--no-shuffle0"])
    assert orders["--shuffle0"] != orders["--no-shuffle0"] and orders["--shuffle0"] != orders["--shuffle1"]


def test_max_side_downscales_keeping_aspect(tmp_path):
    rng = np.random.default_rng(4)
    tree = tmp_path / "tree"
    sizes = {"wide.png": (40, 20), "tall.png": (9, 30), "small.png": (10, 6)}
    for fname, size in sizes.items():
        for cls in ("a", "b"):
            save_image(tree / cls / fname, rng, size=size, fmt="PNG")
    out = tmp_path / "out"
    assert make(["imagefolder", "--root", str(tree), "--out", str(out), "--val", "0", "--test", "0",
                 "--max-side", "16", "--no-shuffle"]) == 0
    got = read_split(out, "train")
    # class a then b, files sorted: small (kept), tall 9x30 -> 5x16 (4.8 rounded), wide 40x20 -> 16x8
    assert [decode(d).size for _, d, _ in got] == [(10, 6), (5, 16), (16, 8)] * 2
    assert got[0][1] == (tree / "a" / "small.png").read_bytes()  # no resize needed: the original bytes
    # the downscaled image is the original resampled, not a crop
    wide = np.asarray(Image.open(tree / "a" / "wide.png").resize((16, 8), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(np.asarray(decode(got[2][1]), dtype=float) - wide).mean() < 3


def test_jpeg_quality_applies_to_reencoded_images_only(tmp_path):
    rng = np.random.default_rng(5)
    tree = tmp_path / "tree"
    smooth = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8)
    for cls in ("a", "b"):
        (tree / cls).mkdir(parents=True)
        Image.fromarray(np.stack([smooth, smooth[::-1], 255 - smooth], -1)).save(tree / cls / "p.png")
        save_image(tree / cls / "q.jpg", rng, size=(20, 20))
    sizes, pixels = {}, {}
    for quality in (20, 95):
        out = tmp_path / f"q{quality}"
        assert make(["imagefolder", "--root", str(tree), "--out", str(out), "--val", "0", "--test", "0",
                     "--format", "jpg", "--quality", str(quality), "--no-shuffle"]) == 0
        got = read_split(out, "train")  # a/p.png, a/q.jpg, b/p.png, b/q.jpg
        assert decode(got[0][1]).format == "JPEG"
        sizes[quality] = len(got[0][1])
        pixels[quality] = np.asarray(decode(got[0][1]), dtype=float)
        assert got[1][1] == (tree / "a" / "q.jpg").read_bytes()  # already JPEG: never re-compressed
        # PIL's encoder at this quality gives exactly these bytes
        assert got[0][1] == encode_file(tree / "a" / "p.png", "jpg", quality=quality)
    original = np.asarray(Image.open(tree / "a" / "p.png"), dtype=float)
    assert sizes[20] < sizes[95]
    assert np.abs(pixels[20] - original).mean() > np.abs(pixels[95] - original).mean()
    assert make(["imagefolder", "--root", str(tree), "--out", str(tmp_path / "bad"), "--quality", "0"]) == 2


def test_max_shard_size_closes_shards_by_bytes(tmp_path, cub_root):
    root, _ = cub_root
    out = tmp_path / "out"
    assert make(["cub", "--root", str(root), "--out", str(out), "--val", "0", "--format", "jpg",
                 "--max-shard-size", "300", "--samples-per-shard", "100"]) == 0
    info = load_info(out)
    # each sample holds over 300 bytes (checked before each write): one sample per shard
    assert info.split("train").shard_lengths == (1,) * 9 and info.split("test").shard_lengths == (1,) * 6
    assert make(["cub", "--root", str(root), "--out", str(tmp_path / "big"), "--val", "0", "--format", "jpg",
                 "--max-shard-size", "1e9", "--samples-per-shard", "100"]) == 0
    assert load_info(tmp_path / "big").split("train").shard_lengths == (9,)


@pytest.mark.parametrize("argv, message", [
    (["--test", "0.2"], "unrecognized arguments: --test"),  # official test split: no --test option
    (["--val", "1.5"], "--val must be in"),
    (["--workers", "0"], "--workers"),
    (["--max-side", "0"], "--max-side"),
])
def test_official_source_user_errors(tmp_path, cub_root, capsys, argv, message):
    root, _ = cub_root
    assert make(["cub", "--root", str(root), "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.splitlines()[-1].startswith("lacvit-make-shards: error:")


def test_worker_errors_name_the_file(tmp_path, cub_root, capsys):
    root, _ = cub_root
    victim = next((root / "images").rglob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:30])
    assert make(["cub", "--root", str(root), "--out", str(tmp_path / "o"), "--workers", "2"]) == 2
    assert victim.name in capsys.readouterr().err
    assert not (tmp_path / "o" / INFO_FILE).exists() and not list((tmp_path / "o").glob("*.tar"))
