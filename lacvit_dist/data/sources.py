"""Sample sources for shard writing: the labelled image sets `lacvit-make-shards` reads.

Sources (all read local files; nothing downloads):

* ``digits``: scikit-learn's bundled 8x8 digits; ``imagefolder``: ROOT/<class>/<image>. No official
  split (the writer makes a stratified one).
* ``cifar10`` / ``cifar100``: the official python-pickle archives, the ``.tar.gz`` itself (read with
  tarfile, nothing extracted to disk) or its extracted folder; official train/test split.
* ``cub``: CUB-200-2011 with its official train/test split (``train_test_split.txt``).
* ``pets``: Oxford-IIIT Pet from ``annotations/trainval.txt`` and ``annotations/test.txt``.
* ``flowers``: Oxford 102 Flowers from ``imagelabels.mat`` and ``setid.mat`` (official train/val/test).

Every source is a :class:`Source`: class names, one int64 label per item, the official split (item
indices per split, or None) and ``payload(i)``, which returns the item's image lazily as a file path
(str) or a small uint8 array. Payloads are cheap to pickle, so worker processes can encode them;
`lacvit_dist.data.encoding.encode_payload` turns one into shard bytes.
"""
from __future__ import annotations

import os
import pickle
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lacvit_dist.data.encoding import Payload

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
class SourceError(ValueError):
    """A source's files are missing or malformed; the message names the file (and line)."""


@dataclass
class Source:
    """A labelled image set read lazily from local files.

    `labels[i]` is item i's 0-based label and `payload(i)` its image (path or array), loaded only
    when called. `splits` maps official split names ("train", "test", and "val" where the data set
    defines one) to item indices in the official file order; None means the data set has no
    official split. `notes` describes the split for `_info.json`.
    """

    name: str
    class_names: list[str]
    labels: np.ndarray
    payload: Callable[[int], Payload]
    splits: dict[str, np.ndarray] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def items(self, indices: Sequence[int] | None = None) -> Iterator[tuple[Payload, int]]:
        """(payload, label) for the given indices (default: all), produced lazily one at a time."""
        for i in range(len(self.labels)) if indices is None else indices:
            yield self.payload(int(i)), int(self.labels[i])


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

def digits_source() -> tuple[list[str], np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 real 8x8 grey images, no download).

    Returns (class names "0".."9", images uint8 [N, 8, 8] scaled from 0..16 to 0..255, labels int64 [N]).
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import costs ~1 s

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    class_names = [str(c) for c in range(10)]
    return class_names, images, labels


def image_folder_source(root: str | os.PathLike) -> tuple[list[str], list[Path], np.ndarray]:
    """An ImageFolder tree: one sub-directory per class (sorted names = label order), image files
    (extensions in IMAGE_SUFFIXES, any case) sorted by name; hidden files and directories skipped.

    Returns (class names, file paths, labels int64) in class-then-file order.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder root {root_path} does not exist or is not a directory")
    class_dirs = sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"image folder root {root_path} has no class sub-directories")
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            raise ValueError(f"class directory {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        paths.extend(files)
        labels.extend([label] * len(files))
    return [d.name for d in class_dirs], paths, np.asarray(labels, dtype=np.int64)


def _image_files(class_dir: Path) -> list[Path]:
    """Image files directly in `class_dir`, sorted by name for a deterministic order."""
    return sorted(p for p in class_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def digits(name: str = "digits") -> Source:
    """:func:`digits_source` as a :class:`Source` (no official split)."""
    class_names, images, labels = digits_source()
    return Source(name, class_names, labels, lambda i: images[i],
                  notes={"source": "scikit-learn digits", "split": "stratified"})


def image_folder(root: str | os.PathLike, name: str | None = None) -> Source:
    """:func:`image_folder_source` as a :class:`Source` (no official split); payloads are paths."""
    class_names, paths, labels = image_folder_source(root)
    files = [str(p) for p in paths]
    return Source(name or Path(root).expanduser().resolve().name, class_names, labels, files.__getitem__,
                  notes={"source": "imagefolder", "split": "stratified"})


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (official python pickles)
# ----------------------------------------------------------------------------------------------

# variant -> (archive name, folder inside it, train files, test files, meta file, label key, names key)
_CIFAR = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python",
                 ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def cifar(root: str | os.PathLike, variant: str = "cifar10", name: str | None = None) -> Source:
    """CIFAR-10 or CIFAR-100 from the official python version: `root` is the downloaded archive
    (cifar-10-python.tar.gz / cifar-100-python.tar.gz, read in memory, nothing extracted), the
    extracted folder (cifar-10-batches-py / cifar-100-python), or a directory holding either.

    Official train (50,000) / test (10,000) split; CIFAR-100 uses the 100 fine labels and
    fine_label_names. Payloads are uint8 [32, 32, 3] arrays (the whole set is ~180 MB in memory).
    """
    if variant not in _CIFAR:
        raise ValueError(f"CIFAR variant must be one of {sorted(_CIFAR)}, got {variant!r}")
    archive, folder, train_files, test_files, meta_file, label_key, names_key = _CIFAR[variant]
    wanted = train_files + test_files + [meta_file]
    path = Path(root).expanduser()
    if path.is_dir() and not (path / meta_file).is_file():  # a parent directory: look for ours inside
        if (path / folder).is_dir():
            path = path / folder
        elif (path / archive).is_file():
            path = path / archive
    if path.is_dir():
        missing = [f for f in wanted if not (path / f).is_file()]
        if missing:
            raise SourceError(f"{variant} folder {path} lacks {', '.join(missing)} (expected the extracted "
                              f"{archive}: {folder}/ with {', '.join(wanted)})")
        blobs = {f: (path / f).read_bytes() for f in wanted}
        where = {f: str(path / f) for f in wanted}
    elif path.is_file():
        blobs = _read_tar_members(path, wanted)
        where = {f: f"{path}:{folder}/{f}" for f in wanted}
    else:
        raise SourceError(f"{variant} source {path} does not exist (give {archive} or its extracted {folder}/)")
    meta = _unpickle(blobs[meta_file], where[meta_file])
    class_names = [_text(n) for n in _pickle_key(meta, names_key, where[meta_file])]
    arrays, labels, counts = [], [], {}
    for split, files in (("train", train_files), ("test", test_files)):
        counts[split] = 0
        for f in files:
            batch = _unpickle(blobs.pop(f), where[f])
            data = np.asarray(_pickle_key(batch, "data", where[f]))
            lab = np.asarray(_pickle_key(batch, label_key, where[f]), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise SourceError(f"{where[f]}: 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
            if lab.shape != (len(data),):
                raise SourceError(f"{where[f]}: {len(data)} images but {lab.size} {label_key!r}")
            if lab.size and not (0 <= lab.min() and lab.max() < len(class_names)):
                raise SourceError(f"{where[f]}: {label_key!r} outside [0, {len(class_names)}) "
                                  f"(min {lab.min()}, max {lab.max()})")
            arrays.append(data)
            labels.append(lab)
            counts[split] += len(data)
    images = np.concatenate(arrays).reshape(-1, 3, 32, 32)  # channel planes R, G, B, rows of 32
    n_train = counts["train"]
    splits = {"train": np.arange(n_train), "test": np.arange(n_train, n_train + counts["test"])}
    return Source(name or variant, class_names, np.concatenate(labels), lambda i: images[i].transpose(1, 2, 0),
                  splits=splits, notes={"source": f"{variant} (official python version)", "split": "official train/test"})


def _read_tar_members(path: Path, wanted: list[str]) -> dict[str, bytes]:
    """The members of a (gzipped) tar whose base names are in `wanted`, read in one pass."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"cannot read archive {path}: {exc}") from None
    missing = [f for f in wanted if f not in found]
    if missing:
        raise SourceError(f"archive {path} lacks {', '.join(missing)}")
    return found


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = pickle.loads(blob, encoding="bytes")  # the official files are Python 2 pickles
    except Exception as exc:  # any unpickling failure means a malformed file
        raise SourceError(f"{where}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _pickle_key(obj: dict, key: str, where: str) -> Any:
    for k in (key.encode(), key):  # Python 2 pickles give bytes keys
        if k in obj:
            return obj[k]
    raise SourceError(f"{where}: missing key {key!r} (has {sorted(_text(k) for k in obj)})")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------------------
# Line-based official lists (CUB, Pets)
# ----------------------------------------------------------------------------------------------

def _read_rows(path: Path, ncols: int, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a whitespace-separated list file; blank and '#' lines skipped."""
    if not path.is_file():
        raise SourceError(f"missing {what} file {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != ncols:
                raise SourceError(f"{path}:{lineno}: expected {ncols} fields, got {len(fields)}: {line.strip()!r}")
            rows.append((lineno, fields))
    if not rows:
        raise SourceError(f"{what} file {path} has no entries")
    return rows


def _int_field(value: str, path: Path, lineno: int, what: str, lo: int | None = None,
               hi: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SourceError(f"{path}:{lineno}: {what} {value!r} is not an integer") from None
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        raise SourceError(f"{path}:{lineno}: {what} {number} outside [{lo}, {hi}]")
    return number


def _check_files(files: Sequence[str], listed_at: Callable[[int], str]) -> None:
    """Every listed image exists; the error names the first missing one and where it is listed."""
    for n, fname in enumerate(files):
        if not os.path.isfile(fname):
            raise SourceError(f"image {fname} listed at {listed_at(n)} does not exist")


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------

def cub(root: str | os.PathLike, name: str = "cub200") -> Source:
    """CUB-200-2011 with its official split: `root` is the CUB_200_2011 folder (or its parent).

    images.txt (`<id> <relative path>`), train_test_split.txt (`<id> <1 = train, 0 = test>`),
    image_class_labels.txt (`<id> <class 1..200>`), classes.txt (`<class> <NNN.Name>`), images/.
    Labels become 0-based; class names are classes.txt's names without the "NNN." prefix.
    Official 5,994 train / 5,794 test images.
    """
    base = Path(root).expanduser()
    if not (base / "images.txt").is_file() and (base / "CUB_200_2011" / "images.txt").is_file():
        base = base / "CUB_200_2011"
    classes = _read_rows(base / "classes.txt", 2, "CUB classes")
    class_names = []
    for expected, (lineno, (cid, cname)) in enumerate(classes, 1):
        if _int_field(cid, base / "classes.txt", lineno, "class id") != expected:
            raise SourceError(f"{base / 'classes.txt'}:{lineno}: class id {cid}, expected {expected} (ids 1..N in order)")
        class_names.append(re.sub(r"^\d+\.", "", cname))
    images = _id_table(base / "images.txt", "CUB images")
    is_train = _id_table(base / "train_test_split.txt", "CUB train/test split")
    class_of = _id_table(base / "image_class_labels.txt", "CUB image labels")
    ids = sorted(images, key=int)
    for other, other_path in ((is_train, "train_test_split.txt"), (class_of, "image_class_labels.txt")):
        missing = [i for i in ids if i not in other]
        extra = [i for i in other if i not in images]
        if missing or extra:
            what = f"has no line for image id {missing[0]}" if missing else f"names image id {extra[0]} not in images.txt"
            raise SourceError(f"{base / other_path} {what}")
    files, labels, train_flags = [], [], []
    for image_id in ids:
        lineno, rel = images[image_id]
        files.append(str(base / "images" / rel))
        flag_line, flag = is_train[image_id]
        train_flags.append(_int_field(flag, base / "train_test_split.txt", flag_line, "train flag", 0, 1) == 1)
        label_line, label = class_of[image_id]
        labels.append(_int_field(label, base / "image_class_labels.txt", label_line, "class id", 1,
                                 len(class_names)) - 1)
    _check_files(files, lambda n: f"{base / 'images.txt'}:{images[ids[n]][0]}")
    train_flags = np.asarray(train_flags, dtype=bool)
    splits = {"train": np.flatnonzero(train_flags), "test": np.flatnonzero(~train_flags)}
    return Source(name, class_names, np.asarray(labels, dtype=np.int64), files.__getitem__, splits=splits,
                  notes={"source": "CUB-200-2011", "split": "official train_test_split.txt"})


def _id_table(path: Path, what: str) -> dict[str, tuple[int, str]]:
    """`<id> <value>` lines -> {id: (line number, value)}; duplicate ids are an error."""
    table: dict[str, tuple[int, str]] = {}
    for lineno, (key, value) in _read_rows(path, 2, what):
        if key in table:
            raise SourceError(f"{path}:{lineno}: image id {key} already listed at line {table[key][0]}")
        table[key] = (lineno, value)
    return table


# ----------------------------------------------------------------------------------------------
# Oxford-IIIT Pet
# ----------------------------------------------------------------------------------------------

def pets(root: str | os.PathLike, name: str = "pets") -> Source:
    """Oxford-IIIT Pet from its official lists: `root` holds annotations/trainval.txt,
    annotations/test.txt (lines `<image name> <class id 1..37> <species> <breed id>`) and
    images/<image name>.jpg. Labels are the class ids, 0-based. A class's name is the image name
    without its trailing `_<number>`, spelled as in the official files (cats capitalised, e.g.
    "Abyssinian", "Egyptian_Mau"; dogs lower-case, e.g. "american_bulldog").
    Official 3,680 trainval ("train" here) / 3,669 test images.
    """
    base = Path(root).expanduser()
    files, labels, origin, split_of = [], [], [], []
    names: dict[int, tuple[str, Path, int]] = {}
    seen: dict[str, tuple[Path, int]] = {}
    for split, list_name in (("train", "trainval.txt"), ("test", "test.txt")):
        list_path = base / "annotations" / list_name
        for lineno, (image, cid, species, breed) in _read_rows(list_path, 4, f"Pets {split} list"):
            class_id = _int_field(cid, list_path, lineno, "class id", 1)
            _int_field(species, list_path, lineno, "species", 1, 2)
            _int_field(breed, list_path, lineno, "breed id", 1)
            if image in seen:
                raise SourceError(f"{list_path}:{lineno}: image {image} already listed at "
                                  f"{seen[image][0]}:{seen[image][1]}")
            seen[image] = (list_path, lineno)
            class_name = image.rsplit("_", 1)[0]
            if "_" not in image or not class_name:
                raise SourceError(f"{list_path}:{lineno}: image name {image!r} is not <breed>_<number>")
            if class_id in names and names[class_id][0] != class_name:
                first = names[class_id]
                raise SourceError(f"{list_path}:{lineno}: class id {class_id} is {class_name!r} here but "
                                  f"{first[0]!r} at {first[1]}:{first[2]}")
            names.setdefault(class_id, (class_name, list_path, lineno))
            files.append(str(base / "images" / f"{image}.jpg"))
            labels.append(class_id - 1)
            origin.append((list_path, lineno))
            split_of.append(split == "train")
    num_classes = max(names)
    absent = [c for c in range(1, num_classes + 1) if c not in names]
    if absent:
        raise SourceError(f"Pets class id {absent[0]} has no image in {base / 'annotations'}/trainval.txt or "
                          "test.txt, so its name is unknown")
    class_names = [names[c][0] for c in range(1, num_classes + 1)]
    if len(set(class_names)) != len(class_names):
        raise SourceError(f"Pets: two class ids share a breed name in {base / 'annotations'}: {class_names}")
    _check_files(files, lambda n: f"{origin[n][0]}:{origin[n][1]}")
    flags = np.asarray(split_of, dtype=bool)
    splits = {"train": np.flatnonzero(flags), "test": np.flatnonzero(~flags)}
    return Source(name, class_names, np.asarray(labels, dtype=np.int64), files.__getitem__, splits=splits,
                  notes={"source": "Oxford-IIIT Pet", "split": "official trainval.txt (train) / test.txt"})


# ----------------------------------------------------------------------------------------------
# Oxford 102 Flowers
# ----------------------------------------------------------------------------------------------

def flowers(root: str | os.PathLike, name: str = "flowers102") -> Source:
    """Oxford 102 Flowers from its official files in `root`: imagelabels.mat (`labels`, 1..102 per
    image), setid.mat (`trnid`, `valid`, `tstid`: 1-based image ids) and jpg/image_NNNNN.jpg.

    The official split is kept as published: train and val have 10 images per class (1,020 each)
    and test is the large part (6,149). The data set ships no class names: names are the official
    1-based label as three digits ("001".."102"), so name = label + 1.
    """
    from scipy.io import loadmat  # deferred: only this source needs scipy

    base = Path(root).expanduser()

    def load(fname: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        path = base / fname
        if not path.is_file():
            raise SourceError(f"missing 102 Flowers file {path}")
        try:
            mat = loadmat(path)
        except Exception as exc:  # scipy raises several types for malformed files
            raise SourceError(f"{path}: not a readable .mat file ({type(exc).__name__}: {exc})") from None
        out = {}
        for key in keys:
            if key not in mat:
                raise SourceError(f"{path}: missing variable {key!r} (has {sorted(k for k in mat if not k.startswith('__'))})")
            value = np.asarray(mat[key]).ravel()
            if value.size == 0 or not np.issubdtype(value.dtype, np.number) or not np.all(value == np.round(value)):
                raise SourceError(f"{path}: {key!r} must be a non-empty vector of integers")
            out[key] = value.astype(np.int64)
        return out

    raw_labels = load("imagelabels.mat", ["labels"])["labels"]
    ids = load("setid.mat", ["trnid", "valid", "tstid"])
    if raw_labels.min() < 1:
        raise SourceError(f"{base / 'imagelabels.mat'}: 'labels' must be 1-based, found {raw_labels.min()}")
    num_classes = int(raw_labels.max())
    owner: dict[int, str] = {}
    splits = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        idx = ids[key]
        bad = idx[(idx < 1) | (idx > len(raw_labels))]
        if bad.size:
            raise SourceError(f"{base / 'setid.mat'}: {key!r} holds image id {bad[0]} outside "
                              f"[1, {len(raw_labels)}] (imagelabels.mat has {len(raw_labels)} labels)")
        for image_id in idx.tolist():
            if image_id in owner:
                raise SourceError(f"{base / 'setid.mat'}: image id {image_id} is in both {owner[image_id]!r} and {key!r}")
            owner[image_id] = key
        splits[split] = idx - 1
    files = [str(base / "jpg" / f"image_{i:05d}.jpg") for i in range(1, len(raw_labels) + 1)]
    used = np.concatenate(list(splits.values()))
    _check_files([files[i] for i in used], lambda n: f"{base / 'setid.mat'} (image id {used[n] + 1})")
    class_names = [f"{c:03d}" for c in range(1, num_classes + 1)]
    return Source(name, class_names, raw_labels - 1, files.__getitem__, splits=splits,
                  notes={"source": "Oxford 102 Flowers",
                         "split": "official setid.mat: trnid (train), valid (val), tstid (test)"})


SOURCES: dict[str, Callable[..., Source]] = {
    "digits": digits, "imagefolder": image_folder, "cub": cub, "pets": pets, "flowers": flowers,
    "cifar10": lambda root, name=None: cifar(root, "cifar10", name),
    "cifar100": lambda root, name=None: cifar(root, "cifar100", name),
}
