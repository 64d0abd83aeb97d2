"""Bad data on the real training path (a plain `python train.py`, one CPU rank): a corrupt train sample no
longer crashes stage 1's closing kNN monitor (its bank reads train as training does: skip and count); a shard
set written with --val 0 runs stage 1 + stage 2 with data.val_split=null and stops at start-up without it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from conftest import REPO
from lacvit_dist.data.make_shards import main as make_shards
from lacvit_dist.data.shards import load_info

TINY = ["model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
        "model.proj_dim=16", "data.num_workers=0", "data.shuffle_buffer=50", "logging.tensorboard=false"] + [
    f"{stage}.{key}" for stage in ("stage1", "stage2")
    for key in ("epochs=1", "steps_per_epoch=2", "micro_batch_size=8", "log_every_steps=1")]


def train(tmp_path: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "demo_digits.yaml"),
           f"data.root={data}", f"run.output_dir={tmp_path}", "run.name=run", *TINY, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def corrupt_one_train_image(root: Path) -> str:
    """Replace the image of the first sample of the first train shard with bytes that are not an image."""
    shard = Path(load_info(root).split("train").filenames[0])
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    samples[0]["png"] = b"not a png"
    with wds.TarWriter(str(shard)) as sink:
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if k in ("__key__", "png", "cls")})
    return samples[0]["__key__"]


def test_corrupt_train_sample_is_skipped_and_counted_by_the_knn_bank(tmp_path):
    data = tmp_path / "digits"
    assert make_shards(["digits", "--out", str(data), "--samples-per-shard", "400", "--quiet"]) == 0
    corrupt_one_train_image(data)
    proc = train(tmp_path, data, "run.stages=[stage1]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "stage1" / "results.json").read_text())
    info = load_info(data)
    assert results["val"]["bank_bad_samples/undecodable_image"] == 1
    assert results["val"]["bank_samples"] == info.split("train").num_samples - 1
    assert results["val"]["samples"] == info.split("val").num_samples
    assert set(results["bad_samples"]) >= {"undecodable_image", "unreadable_tar"}  # the training stream's
    assert (tmp_path / "run" / "stage1" / "timm" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def no_val(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("noval")
    assert make_shards(["digits", "--out", str(data), "--val", "0", "--samples-per-shard", "400", "--quiet"]) == 0
    assert "val" not in load_info(data).splits
    return data


def test_shards_without_val_stop_at_start_up_naming_the_way_out(tmp_path, no_val):
    proc = train(tmp_path, no_val, "run.stages=[stage1,stage2]")
    assert proc.returncode == 2
    assert "data.val_split" in proc.stderr and "--val 0" in proc.stderr and "data.val_split=null" in proc.stderr
    assert not (tmp_path / "run" / "stage1" / "checkpoints").exists()  # stopped before the first step


def test_shards_without_val_run_both_stages_with_val_split_null(tmp_path, no_val):
    proc = train(tmp_path, no_val, "run.stages=[stage1,stage2]", "data.val_split=null")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stage1, stage2 = (json.loads((tmp_path / "run" / s / "results.json").read_text()) for s in ("stage1", "stage2"))
    assert stage1["val_split"] is None and "val" not in stage1
    assert stage2["val_split"] is None and "val" not in stage2
    assert stage2["test"]["samples"] == load_info(no_val).split("test").num_samples
