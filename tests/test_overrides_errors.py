"""Bad model settings fail at start-up with the config field named: a `model.overrides` key the timm model does not
take, and a stage-2 backbone of another architecture (named by path, with the differing settings read from the
manifest of stage 1's export)."""
import dataclasses

import pytest
import torch

from lacvit_dist.config import ConfigError, ModelConfig, load_config, to_dict
from lacvit_dist.models.export import export_timm
from lacvit_dist.models.factory import build_classifier, create_backbone, image_stats

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(name="vit_tiny_patch16_224", overrides={**TINY, **overrides})


def test_unknown_override_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.overrides\.depht: timm model 'vit_tiny_patch16_224' takes no "
                                          r"argument 'depht'"):
        create_backbone(tiny(depht=2))


def test_override_of_the_wrong_type_names_the_section():
    with pytest.raises(ConfigError, match=r"model\.overrides: timm model 'vit_tiny_patch16_224' refused"):
        create_backbone(tiny(depth="two"))


def _stage1_backbone(path, model_cfg: ModelConfig) -> None:
    """A backbone export folder as stage 1 writes it (lacvit_dist.train.loop._export)."""
    cfg = load_config(None, [f"model.name={model_cfg.name}"] + [f"model.overrides.{k}={v}"
                                                               for k, v in model_cfg.overrides.items()])
    torch.manual_seed(0)
    model = create_backbone(cfg.model, num_classes=0)
    export_timm(model, model.state_dict(), path, stats=image_stats(model), manifest={"stage": "stage1",
                                                                                      "config": to_dict(cfg)})


def test_stage2_backbone_of_another_architecture_names_file_and_settings(tmp_path):
    path = tmp_path / "stage1" / "timm"
    _stage1_backbone(path, tiny(depth=2, embed_dim=48))
    with pytest.raises(ConfigError) as err:
        build_classifier(tiny(), 10, str(path), freeze_backbone=True)
    message = str(err.value)
    assert message.startswith(f"stage2.backbone_path: {path} does not fit")
    assert f"manifest ({path}/config.json)" in message
    assert "model.overrides.depth: 2 -> 1" in message and "model.overrides.embed_dim: 48 -> 32" in message
    assert "shape mismatches ['blocks.0." in message and "unexpected ['blocks.1." in message

    # A plain weights file has no manifest: the tensors that do not fit are still named.
    with pytest.raises(ConfigError, match=r"does not fit this run's model: tensors: .*shape mismatches") as err:
        build_classifier(tiny(), 10, str(path / "model.safetensors"), freeze_backbone=True)
    assert "manifest" not in str(err.value)


def test_stage2_backbone_of_the_same_architecture_loads(tmp_path):
    path = tmp_path / "timm"
    cfg = tiny()
    _stage1_backbone(path, cfg)
    # Settings that do not change the tensors (drop-path) load without complaint.
    model = build_classifier(dataclasses.replace(cfg, drop_path_rate=0.1), 10, str(path), freeze_backbone=True)
    torch.manual_seed(0)
    expected = create_backbone(cfg, num_classes=0).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
