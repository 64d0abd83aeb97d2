"""Start-up check of the data a run will read, before its first step: every split the configured stages read
exists and is non-empty, and every shard of it is a readable tar that ends properly and holds the number of
samples `_info.json` lists. Cheap: tar headers only (the tar index, seeking over the data), no image decoded;
each rank checks its share of the shards.

Problems in the train split under data.on_bad_sample=skip are warnings (training and the kNN bank skip and count
what they cannot read); any other problem stops the run, naming the config field, split and shard.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch.distributed as dist

from lacvit_dist.config import Config
from lacvit_dist.data.shards import PIPE_PREFIX, DatasetInfo

BLOCK = 512  # tar block; a tar ends with zero blocks (end-of-archive marker)
SHOWN = 10  # problems listed in an error


class DataCheckError(ValueError):
    """The data cannot serve the configured run; the message names config field, split and shard."""


def splits_read(cfg: Config) -> dict[str, str]:
    """Split name -> config field, for every split the run's stages read: stage 1 trains on train and monitors
    on val (kNN bank: train); stage 2 and the baseline also evaluate on test. data.val_split=null: no val."""
    fields = {"data.train_split": cfg.data.train_split, "data.val_split": cfg.data.val_split}
    if any(stage != "stage1" for stage in cfg.run.stages):
        fields["data.test_split"] = cfg.data.test_split
    read: dict[str, str] = {}
    for field, name in fields.items():
        if name is not None:
            read.setdefault(name, field)
    return read


class _Unusable(Exception):
    """What is wrong with a shard (the message)."""


def _number(field: bytes) -> int:
    """A tar header number: octal text, or GNU base-256 when the first byte has its high bit set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def _pax_path(records: bytes) -> str | None:
    for record in records.decode("utf-8", "replace").split("\n"):
        key, _, value = record.partition(" ")[2].partition("=")
        if key == "path":
            return value
    return None


def tar_member_names(path: str) -> list[str]:
    """The regular-file member names of an uncompressed tar, from its headers alone (one 512-byte read per
    member, seeking over the data: ~10x faster than tarfile, which parses every header field). Raises
    _Unusable where tarfile would stop without a word: a header cut short, or no end-of-archive block."""
    names: list[str] = []
    size, offset, long_name = os.path.getsize(path), 0, None
    with open(path, "rb") as f:
        while True:
            f.seek(offset)
            header = f.read(BLOCK)
            if len(header) < BLOCK:
                raise _Unusable(f"cut short at byte {offset} (no end-of-archive block after its last member)")
            if not any(header):
                return names  # the end-of-archive marker
            checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
            try:
                valid = checksum == _number(header[148:156])
                length, kind = _number(header[124:136]), header[156:157]
            except ValueError:
                valid = False
            if not valid:
                raise _Unusable("not a tar" if offset == 0 else f"corrupt tar header at byte {offset}")
            data, offset = offset + BLOCK, offset + BLOCK + -(-length // BLOCK) * BLOCK
            if offset > size:
                raise _Unusable(f"cut short: the member at byte {data - BLOCK} ends after the end of the file")
            if kind in (b"L", b"x"):  # GNU long name / PAX header: the name of the next member
                f.seek(data)
                extra = f.read(length)
                long_name = extra.rstrip(b"\0").decode("utf-8", "replace") if kind == b"L" else _pax_path(extra)
                continue
            if kind in (b"0", b"\0"):
                name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
                prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
                names.append(long_name or (f"{prefix}/{name}" if prefix else name))
            long_name = None


def shard_problem(path: str, listed: int) -> str | None:
    """What is wrong with one shard, or None: cannot be opened, not a tar, cut short or corrupt, or a number of
    samples other than `listed`. pipe: URLs are not checked (a shell command: only the training read runs it)."""
    if path.startswith(PIPE_PREFIX):
        return None
    from webdataset.tariterators import base_plus_ext  # webdataset's own sample key of a member name

    try:
        names = tar_member_names(path)
    except OSError as err:
        return f"not a readable tar: {err}"
    except _Unusable as err:
        return f"not a readable tar: {err}" if str(err) == "not a tar" else str(err)
    keys = [base_plus_ext(name)[0] for name in names if not name.startswith("__")]
    samples = sum(1 for i, key in enumerate(keys) if key is not None and (i == 0 or key != keys[i - 1]))
    if samples != listed:
        return f"holds {samples} samples, _info.json lists {listed}"
    return None


def _gather(problems: list[str]) -> list[str]:
    """Every rank's problems, on every rank (so that all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return problems
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    return [problem for part in everyone for problem in (part or [])]


def _shards(info: DatasetInfo, read: dict[str, str]) -> Iterable[tuple[str, str, str, int]]:
    for name, field in read.items():
        split = info.splits[name]
        for path, listed in zip(split.filenames, split.shard_lengths):
            yield field, name, path, listed


def check_data(cfg: Config, info: DatasetInfo, rank: int = 0, world_size: int = 1) -> list[str]:
    """Raise DataCheckError for what would fail later; return the warnings (train shards the run will skip
    and count under data.on_bad_sample=skip). A collective when a process group is up: call on every rank."""
    read = splits_read(cfg)
    for name, field in read.items():
        split = info.splits.get(name)
        if split is None:
            hint = (" (shards written with --val 0 have none: set data.val_split=null to run without a val "
                    "split)" if field == "data.val_split" else "")
            raise DataCheckError(f"{field}: data set {info.root} has no split {name!r}; it has "
                                 f"{sorted(info.splits)}{hint}")
        if not split.filenames or split.num_samples == 0:
            raise DataCheckError(f"{field}: split {name!r} of data set {info.root} is empty")
    mine = [(field, name, path, problem) for i, (field, name, path, listed) in enumerate(_shards(info, read))
            if i % world_size == rank and (problem := shard_problem(path, listed)) is not None]
    lenient = {cfg.data.train_split} if cfg.data.on_bad_sample == "skip" else set()
    problems = _gather([f"{field}: split {name!r}, shard {path}: {problem}" for field, name, path, problem in mine
                        if name not in lenient])
    if problems:
        raise DataCheckError(f"{len(problems)} unusable shard(s): " + "; ".join(problems[:SHOWN])
                             + (" ..." if len(problems) > SHOWN else ""))
    return _gather([f"data.train_split: split {name!r}, shard {path}: {problem} (data.on_bad_sample=skip: what "
                    f"cannot be read is skipped and counted as unreadable_tar)" for _, name, path, problem in mine
                    if name in lenient])
