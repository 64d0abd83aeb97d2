"""Every stage exports in timm's own format (<stage>/timm: config.json + model.safetensors): a real tiny run,
then timm alone (create_model("local-dir:..."), resolve_data_config, create_transform) reproduces the reported
test accuracy exactly; the manifest facts travel in config.json."""
import json
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from lacvit_dist.io import sha256
from lacvit_dist.train.checkpoint import tag_for_step
from lacvit_dist.data.pipeline import eval_loader
from lacvit_dist.data.shards import load_info
from test_train import launch, results


@pytest.fixture(scope="module")
def run_dir(digits_root, tmp_path_factory):
    """All three stages in one plain process (the cheapest real run)."""
    return launch([sys.executable], tmp_path_factory.mktemp("export"), digits_root,
                  "run.stages=[stage1,stage2,baseline]", name="export")


def timm_accuracy(model: torch.nn.Module, info, split: str) -> tuple[float, int]:
    """Top-1 of `model` on `split`, with nothing but timm's own data config and transform."""
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    correct = total = 0
    with torch.no_grad():
        for images, labels, _ in eval_loader(info.split(split), info.num_classes, transform, 64, rank=0,
                                             world_size=1, num_workers=0):
            correct += (model(images).argmax(-1) == labels).sum().item()
            total += labels.numel()
    return correct / total, total


@pytest.mark.parametrize("stage", ["stage2", "baseline"])
def test_timm_loads_the_classifier_by_folder_and_reproduces_test_accuracy(digits_root, run_dir, stage):
    info = load_info(digits_root)
    folder = run_dir / stage / "timm"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    reported = results(run_dir, stage)
    top1, samples = timm_accuracy(model, info, "test")
    assert samples == reported["test"]["samples"] and top1 == reported["test"]["top1"]

    config = json.loads((folder / "config.json").read_text())
    assert config["label_names"] == list(info.class_names) and config["num_classes"] == info.num_classes
    manifest = config["lacvit"]
    assert manifest["stage"] == stage and manifest["step"] == reported["steps"]
    assert manifest["source_checkpoint"] == str(run_dir / stage / "checkpoints" / tag_for_step(reported["steps"]))
    assert manifest["sha256"] == sha256(folder / "model.safetensors")


def test_stage1_backbone_exports_without_a_head(run_dir):
    folder = run_dir / "stage1" / "timm"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert model.num_classes == 0
    assert "label_names" not in json.loads((folder / "config.json").read_text())
    backbone = load_file(folder / "model.safetensors")
    assert set(backbone) == set(model.state_dict())
    assert all(torch.equal(backbone[k], v) for k, v in model.state_dict().items())


def test_evaluate_tool_reads_the_timm_folder(digits_root, run_dir, tmp_path):
    from lacvit_dist.evaluation.offline import main as evaluate

    assert evaluate([str(run_dir / "stage2" / "timm"), "--data", str(digits_root), "--workers", "0",
                     "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["stage"] == "stage2"
    assert metrics["classification"]["top1"] == results(run_dir, "stage2")["test"]["top1"]
