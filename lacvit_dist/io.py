"""Files others read, written one way: atomically. Each write goes to a temporary file in the target's folder,
is flushed to disk, renamed over the target and the folder flushed, so a reader, a crash or a power loss sees
the previous file or the complete new one, never half of one. Also the safe reads and the hash that go with
those files."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to disk; a file system that cannot is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under `root` and every folder, for writers that close their files without it
    (DeepSpeed's checkpoint files, a staged shard set) before something vouches for them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that needs a file name (safetensors, matplotlib); when the
    block ends without an error it is flushed and renamed over `path`, otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = True) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike, default: Any) -> Any:
    """The JSON in `path`, or `default` when it is missing or unreadable (a status file not yet written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> Path:
    """`state` as fp32 safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    return Path(path)


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
