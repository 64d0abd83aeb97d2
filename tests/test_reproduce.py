"""tools/reproduce_small.py: class subsets, hyper-parameter selection on val only, and the whole experiment
end to end in a reduced setting (tiny ViT, 1 epoch, 2 seeds, a 2-value grid) on the real digits."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO
from lacvit_dist.config import ConfigError
from lacvit_dist.data.shards import encoded_samples, load_info
from lacvit_dist.data.subsets import parse_classes, write_class_subset
from tools.reproduce_small import choose, mean_std, parse_grid


def labels_of(split) -> list[int]:
    return [label for _, label in encoded_samples(split, "png")]


def test_parse_classes():
    assert parse_classes("0-4", 10) == [0, 1, 2, 3, 4]
    assert parse_classes("7, 0-1", 10) == [7, 0, 1]
    for bad in ("0-10", "a", "3-1", "1,1", "-1"):
        with pytest.raises(ValueError):
            parse_classes(bad, 10)


def test_grid_selection_uses_val_and_first_wins_ties():
    grid = parse_grid(["stage1.optimizer.lr=0.1,0.2", "stage1.temperature=0.1,0.5", "baseline.optimizer.lr=1"])
    assert grid["ce"] == [{"baseline.optimizer.lr": "1"}]
    assert len(grid["lacvit"]) == 4 and grid["lacvit"][1] == {"stage1.optimizer.lr": "0.1", "stage1.temperature": "0.5"}
    assert parse_grid([]) == {"ce": [{}], "lacvit": [{}]}
    for bad in ("model.name=a,b", "stage1.optimizer.lr", "stage1.optimizer.lr="):
        with pytest.raises(ConfigError):
            parse_grid([bad])
    candidates = [{"val_top1": 0.5, "test_top1": 0.9}, {"val_top1": 0.7, "test_top1": 0.1},
                  {"val_top1": 0.7, "test_top1": 0.2}]
    assert choose(candidates) is candidates[1]  # best val, the earliest of equals; test never consulted
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.264575, abs=1e-6)  # n - 1


def test_class_subset_keeps_splits_and_renumbers_labels(digits_root, tmp_path):
    full = load_info(digits_root)
    subset = write_class_subset(full, [7, 5], tmp_path / "target", "digits-target")
    assert subset.class_names == ("7", "5")
    for name in ("train", "val", "test"):
        original = Counter(labels_of(full.split(name)))
        assert Counter(labels_of(subset.split(name))) == {0: original[7], 1: original[5]}
    info_file = tmp_path / "target" / "_info.json"
    mtime = info_file.stat().st_mtime_ns
    write_class_subset(full, [7, 5], tmp_path / "target", "digits-target")  # reused, not rewritten
    assert info_file.stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError):  # other classes never overwrite what is there
        write_class_subset(full, [1, 2], tmp_path / "target", "digits-target")


TINY = ["model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
        "model.proj_dim=16", "data.num_workers=0", "data.shuffle_buffer=50"] + [
    f"{stage}.{key}" for stage in ("stage1", "stage2", "baseline")
    for key in ("steps_per_epoch=2", "micro_batch_size=16", "log_every_steps=1")]


def test_reproduce_small_end_to_end(digits_root, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "reproduce_small.py"), "--data", str(digits_root), "--out", str(out),
           "--seeds", "3", "4", "--pretrain-epochs", "1", "--stage1-epochs", "1", "--stage2-epochs", "1",
           "--grid", "stage1.optimizer.lr=0.001,0.01", "--grid", "baseline.optimizer.lr=0.003", *TINY]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads((out / "results.json").read_text())

    full, target = load_info(digits_root), load_info(out / "data" / "target")
    assert res["source_classes"] == list("01234") and res["target_classes"] == list("56789")
    test_labels = Counter(labels_of(full.split("test")))
    assert target.split("test").num_samples == sum(test_labels[c] for c in range(5, 10))
    assert res["epochs"] == {"pretrain": 1, "stage1": 1, "stage2": 1, "baseline": 2}  # equal epoch budget

    # Selection: the LaCViT setting with the best VAL Top-1 of the first seed, then every seed with it.
    lacvit = res["methods"]["lacvit"]
    assert [c["hp"] for c in res["selection"]["lacvit"]] == [{"stage1.optimizer.lr": "0.001"},
                                                             {"stage1.optimizer.lr": "0.01"}]
    assert lacvit["hp"] == max(res["selection"]["lacvit"], key=lambda c: c["val_top1"])["hp"]
    for method, final_stage in (("lacvit", "stage2"), ("ce", "baseline")):
        m = res["methods"][method]
        assert [r["seed"] for r in m["runs"]] == [3, 4] and all(r["hp"] == m["hp"] for r in m["runs"])
        # The reported figures are the runs' own, each over the whole target test split.
        for run, top1 in zip(m["runs"], m["test_top1"]):
            name = f"{method}-" + "-".join(f"{k}={v}" for k, v in run["hp"].items()) + f"-seed{run['seed']}"
            own = json.loads((out / "runs" / name / final_stage / "results.json").read_text())
            assert own["test"]["top1"] == top1 and own["test"]["samples"] == target.split("test").num_samples
            cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
            assert cfg["model"]["pretrained_path"] == str(out / "pretrained_backbone" / "model.safetensors")
            assert Path(cfg["data"]["root"]).resolve() == Path(target.root) and cfg["run"]["seed"] == run["seed"]
        assert m["test_top1_mean"] == pytest.approx(sum(m["test_top1"]) / 2)

    for backbone in ("pretrained", "ce", "lacvit"):
        health = res["health"][backbone]
        assert 0 <= health["knn_top1"] <= 1 and -1 <= health["mean_cosine"] <= 1 and health["effective_rank"] >= 1
    table = (out / "results.md").read_text()
    assert "| LaCViT (stage 1 + stage 2) |" in table and "| pretrained (CE on source) |" in table
    with Image.open(out / "reproduce_small.png") as figure:
        assert figure.size[0] > 1000
