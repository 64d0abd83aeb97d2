"""Exports in timm's own format: a folder that `timm.create_model("local-dir:<folder>")` builds with no other
argument, as timm's `save_for_hf` writes it:

    config.json        architecture, num_classes, model_args (img_size, depth, global_pool, ...), label_names,
                       pretrained_cfg with the evaluation preprocessing (input_size, mean, std, bilinear squash
                       resize, crop_pct 1.0: the `evaluation` transform, so timm.data.resolve_data_config +
                       create_transform reproduce the reported accuracy), and "lacvit": our manifest (stage,
                       step, source checkpoint, config) with the sha256 of the weights
    model.safetensors  the state dict (fp32)

Stage 1 writes its backbone without a head (num_classes 0); stage 2 and the baseline their classifiers."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf
from torch import nn

from lacvit_dist.io import fsync_tree, sha256
from lacvit_dist.data.transforms import ImageStats
from lacvit_dist.models.layouts import load_state_dict_file

EXPORT_DIR = "timm"  # <run>/<stage>/timm/: each stage's one output
WEIGHTS = "model.safetensors"  # timm's HF_SAFE_WEIGHTS_NAME


def evaluation_data_config(stats: ImageStats) -> dict[str, Any]:
    """`data.transforms.evaluation` in timm's terms: Resize((s, s)) bilinear = squash with crop_pct 1."""
    return {"input_size": (3, stats.img_size, stats.img_size), "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "squash", "mean": tuple(stats.mean), "std": tuple(stats.std)}


def export_timm(model: nn.Module, state: dict[str, torch.Tensor], folder: str | Path, *, stats: ImageStats,
                manifest: dict[str, Any], class_names: list[str] | None = None) -> Path:
    """Write `state` (the full state dict of the timm `model`, gathered under ZeRO-3) and timm's config.json
    into `folder`, atomically: a crash leaves the previous folder or the complete new one."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS))
    extra: dict[str, Any] = {"lacvit": {**manifest, "file": WEIGHTS, "sha256": sha256(tmp / WEIGHTS),
                                        "num_tensors": len(state)}}
    if class_names is not None and getattr(model, "num_classes", 0):
        extra["label_names"] = list(class_names)
    save_config_for_hf(model, str(tmp / "config.json"), model_config=extra, data_config=evaluation_data_config(stats))
    fsync_tree(tmp)  # on disk before the swap makes it the export
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Our manifest (stage, step, config, sha256) in an export folder's config.json; {} if there is none."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("lacvit") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and manifest of an export folder, or of a plain weights file (no manifest: {})."""
    path = Path(path)
    if path.is_dir():
        return load_state_dict_file(path / WEIGHTS), read_manifest(path)
    return load_state_dict_file(path), {}
