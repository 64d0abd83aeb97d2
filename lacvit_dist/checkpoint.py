"""Stage outputs written atomically: the stage-1 backbone (safetensors + manifest) for stage 2, and the
final classifier in timm's own state-dict layout."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _atomic_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `state` as safetensors and a JSON manifest beside it (with the file's sha256), atomically:
    a crash leaves either the previous files or the complete new ones, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(tmp))
    _atomic_replace(tmp, path)
    manifest = {**manifest, "file": path.name, "sha256": sha256(path), "num_tensors": len(state)}
    manifest_path = path.with_suffix(".json")
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _atomic_replace(tmp, manifest_path)
    return path


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(data: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    _atomic_replace(tmp, path)
