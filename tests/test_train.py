"""End to end through the real launchers: `deepspeed train.py` and `torchrun train.py` with 2 CPU ranks (gloo),
and a plain `python train.py`; stage 2 consumes stage 1's backbone; the exported classifier loads in timm."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from dist_helpers import free_port
from lacvit_dist.cli import main
from lacvit_dist.data.pipeline import eval_loader
from lacvit_dist.data.shards import load_info
from lacvit_dist.data.transforms import evaluation
from lacvit_dist.models.factory import image_stats
from lacvit_dist.config import load_config

BIN = Path(sys.executable).parent
CONFIG = REPO / "configs" / "demo_digits.yaml"
TINY = ["model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
        "model.proj_dim=16", "data.num_workers=0", "data.shuffle_buffer=50"] + [
    f"{stage}.{key}" for stage in ("stage1", "stage2", "baseline")
    for key in ("epochs=1", "steps_per_epoch=2", "micro_batch_size=8", "log_every_steps=1")]


def launch(prefix: list[str], tmp_path: Path, data: Path, *overrides: str, name: str = "run") -> Path:
    cmd = [*prefix, str(REPO / "train.py"), "--config", str(CONFIG), f"data.root={data}",
           f"run.output_dir={tmp_path}", f"run.name={name}", *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return tmp_path / name


def results(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "results.json").read_text())


def tags(log_dir: Path) -> dict[str, set[str]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {kind: set(names) for kind, names in acc.Tags().items() if isinstance(names, list)}


@pytest.fixture(scope="module")
def deepspeed_run(digits_root, tmp_path_factory) -> Path:
    """All three stages, 2 ranks, under the deepspeed launcher (shared by the tests below)."""
    return launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())],
                  tmp_path_factory.mktemp("ds"), digits_root, "run.stages=[stage1,stage2,baseline]")


def test_deepspeed_launcher_two_ranks_all_stages(digits_root, deepspeed_run):
    run_dir = deepspeed_run
    info = load_info(digits_root)
    assert (run_dir / "config.yaml").exists()
    assert load_config(run_dir / "config.yaml").model.overrides["depth"] == 1  # the merged config was written

    s1, s2, base = (results(run_dir, s) for s in ("stage1", "stage2", "baseline"))
    assert s1["world_size"] == 2 and s1["global_batch"] == 16 and s1["steps"] == 2
    for res in (s2, base):
        assert res["test"]["samples"] == info.split("test").num_samples  # every test sample, once
        assert res["val"]["samples"] == info.split("val").num_samples
        assert 0.0 <= res["test"]["top1"] <= res["test"]["top5"] <= 1.0

    # Stage 2 trained only the head on top of exactly stage 1's backbone.
    backbone = load_file(run_dir / "stage1" / "timm" / "model.safetensors")
    classifier = load_file(run_dir / "stage2" / "timm" / "model.safetensors")
    assert set(classifier) - set(backbone) == {"head.weight", "head.bias"}
    assert all(torch.equal(backbone[k], classifier[k]) for k in backbone)
    manifest = json.loads((run_dir / "stage1" / "timm" / "config.json").read_text())["lacvit"]
    assert manifest["stage"] == "stage1" and len(manifest["sha256"]) == 64
    assert sorted(p.name for p in (run_dir / "stage1").iterdir() if p.is_file()) == ["results.json"]  # written once
    # The baseline trained its backbone: it moved away from the (shared-seed) initialisation.
    baseline = load_file(run_dir / "baseline" / "timm" / "model.safetensors")
    assert not torch.equal(baseline["blocks.0.attn.qkv.weight"], classifier["blocks.0.attn.qkv.weight"])

    # Stage 1 is monitored on train + val only (kNN, embedding health); the test split is for the classifiers.
    assert "test" not in s1 and s1["val"]["samples"] == info.split("val").num_samples
    assert 0.0 <= s1["val"]["knn_top1"] <= 1.0 and 0.0 < s1["val"]["backbone/isotropy"] <= 1.0
    assert sum(map(sum, s2["test"]["confusion"])) == s2["test"]["samples"]
    assert sum(s2["test"]["support"]) == s2["test"]["samples"]

    stage1_tags = tags(run_dir / "stage1" / "tb")
    assert {"stage1/train/loss", "stage1/train/lr", "stage1/train/images_per_s", "stage1/val/knn_top1",
            "stage1/val/backbone/isotropy", "stage1/val/projection/effective_rank"} <= stage1_tags["scalars"]
    assert (run_dir / "stage1" / "tb" / "projector_config.pbtxt").exists()  # labelled embedding projector
    hparams = EventAccumulator(str(run_dir / "stage1" / "tb" / "hparams"))
    hparams.Reload()
    assert "_hparams_/experiment" in hparams.PluginTagToContent("hparams")  # hyper-parameters + final metrics
    assert "final/val_knn_top1" in hparams.Tags()["scalars"]
    stage2_tags = tags(run_dir / "stage2" / "tb")
    assert {"stage2/train/loss", "stage2/test/top1", "stage2/val/top1"} <= stage2_tags["scalars"]
    assert {"stage2/test/confusion", "stage2/test/per_class_accuracy"} <= set(stage2_tags["images"])
    summary = list(csv.DictReader(open(run_dir / "summary.csv")))
    assert [row["stage"] for row in summary] == ["stage1", "stage2", "baseline"]
    assert float(summary[1]["test_top1"]) == pytest.approx(s2["test"]["top1"])

    # The exported classifier is a plain timm checkpoint: timm loads it and reproduces the reported accuracy.
    cfg = load_config(run_dir / "config.yaml")
    model = timm.create_model(cfg.model.name, checkpoint_path=str(run_dir / "stage2" / "timm" / "model.safetensors"),
                              num_classes=info.num_classes, global_pool=cfg.model.global_pool,
                              **cfg.model.overrides).eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels, _ in eval_loader(info.split("test"), info.num_classes, evaluation(image_stats(model)), 64,
                                             rank=0, world_size=1, num_workers=0):
            correct += (model(images).argmax(-1) == labels).sum().item()
            total += labels.numel()
    assert total == s2["test"]["samples"] and correct / total == pytest.approx(s2["test"]["top1"], abs=1e-9)


def test_torchrun_stage1_then_plain_python_stage2(digits_root, tmp_path):
    run_dir = launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
                     tmp_path, digits_root, "run.stages=[stage1]", name="tr")
    assert results(run_dir, "stage1")["world_size"] == 2
    backbone = run_dir / "stage1" / "timm"
    # A different run folder, a single plain process, the backbone handed over by path.
    run2 = launch([sys.executable], tmp_path, digits_root, "run.stages=[stage2]", f"stage2.backbone_path={backbone}",
                  name="single")
    s2 = results(run2, "stage2")
    assert s2["world_size"] == 1 and s2["test"]["samples"] == load_info(digits_root).split("test").num_samples


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["--config", str(CONFIG), "stage1.epoch=3"]) == 2
    assert "stage1.epoch: unknown key" in capsys.readouterr().err


def test_evaluate_tool_reproduces_training_metrics(digits_root, deepspeed_run, tmp_path, capsys):
    from lacvit_dist.evaluation.offline import main as evaluate

    classifier = deepspeed_run / "stage2" / "timm"
    assert evaluate([str(classifier), "--data", str(digits_root), "--embeddings", "--workers", "0",
                     "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    trained = results(deepspeed_run, "stage2")["test"]
    assert metrics["classification"]["top1"] == pytest.approx(trained["top1"], abs=1e-9)
    assert metrics["classification"]["confusion"] == trained["confusion"]
    assert 0.0 <= metrics["embeddings"]["knn_top1"] <= 1.0
    for png in ("confusion.png", "per_class_accuracy.png", "embeddings_pca.png"):
        assert (tmp_path / "ev" / png).stat().st_size > 1000
    # Nothing is overwritten; a stage-1 backbone gets the embedding report only.
    assert evaluate([str(classifier), "--data", str(digits_root), "--out", str(tmp_path / "ev")]) == 2
    backbone = deepspeed_run / "stage1" / "timm"
    assert evaluate([str(backbone), "--data", str(digits_root), "--split", "val", "--workers", "0",
                     "--out", str(tmp_path / "ev1")]) == 0
    metrics = json.loads((tmp_path / "ev1" / "metrics.json").read_text())
    assert "classification" not in metrics and metrics["embeddings"]["samples"] == load_info(digits_root).split("val").num_samples
