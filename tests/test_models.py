"""Model factory: ViT-B/L/H presets (built on the meta device), activation checkpointing (gradients unchanged)
and the memory estimate. Local pretrained weights in other layouts: tests/test_checkpoint_layouts.py."""
import dataclasses
import resource
from pathlib import Path

import pytest
import torch

from lacvit_dist.config import ConfigError, ModelConfig, load_config
from lacvit_dist.models.factory import apply_activation_checkpointing, build_classifier, build_contrastive_model, create_backbone
from lacvit_dist.models.memory import count_parameters, estimate_memory

REPO = Path(__file__).resolve().parent.parent
TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def tiny_cfg(img_size=32, **kwargs) -> ModelConfig:
    overrides = dict(TINY, img_size=img_size, **kwargs.pop("overrides", {}))
    return ModelConfig(name="vit_tiny_patch16_224", overrides=overrides, **kwargs)


# ----------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset,backbone_millions", [("vit_b16", 85.8), ("vit_l16", 303.3), ("vit_h14", 630.8)])
def test_preset_loads_and_builds_on_meta(preset, backbone_millions):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert cfg.model.overrides["img_size"] == 224 and cfg.deepspeed.precision == "bf16"
    assert cfg.stage1.optimizer.name == "sgd" and cfg.stage1.optimizer.momentum == 0.9
    assert cfg.stage1.temperature == 0.1 and cfg.stage2.optimizer.lr == 0.1
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = build_contrastive_model(cfg.model)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model.backbone) / 1e6 == pytest.approx(backbone_millions, rel=0.01)
    assert model.backbone.patch_embed.img_size == (224, 224)
    # ViT-H in fp32 would be 2.5 GB; the meta build allocates no parameter memory.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300 * 1024  # KiB
    est = estimate_memory(cfg.model, cfg.stage1.micro_batch_size, 2, "bf16", cfg.deepspeed.zero_stage, 8)
    assert 0 < est["total_gib"] < 80


# -------------------------------------------------------------------------------- activation checkpointing
def _grads(mode, offload=False):
    cfg = tiny_cfg(img_size=16, drop_path_rate=0.1, activation_checkpointing=mode, checkpoint_offload=offload)
    torch.manual_seed(0)
    model = build_contrastive_model(cfg).double().train()
    views = torch.randn(4, 2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)  # drop-path draws: the recompute must replay them
    model(views).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_gradients():
    reference = _grads("none")
    for mode, offload in (("timm", False), ("fairscale", False), ("fairscale", True)):
        grads = _grads(mode, offload)
        assert set(grads) == set(reference)  # state-dict / parameter names unchanged
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=f"{mode} {name}")


def test_checkpointing_settings():
    model = create_backbone(tiny_cfg(img_size=16, activation_checkpointing="timm"))
    assert model.grad_checkpointing
    frozen = build_classifier(tiny_cfg(img_size=16, activation_checkpointing="timm"), 3, freeze_backbone=True)
    assert not frozen.grad_checkpointing  # no backward through a frozen encoder
    with pytest.raises(ConfigError, match="checkpoint_offload"):
        create_backbone(tiny_cfg(img_size=16, activation_checkpointing="timm", checkpoint_offload=True))
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        apply_activation_checkpointing(model, "deepspeed")


# ------------------------------------------------------------------------------------------ memory estimate
def test_estimate_memory_formula():
    cfg = tiny_cfg(img_size=16)  # 16 patches + CLS = 17 tokens, width 32, depth 2
    est = estimate_memory(cfg, micro_batch=4, views=2, precision="fp32", zero_stage=0, world_size=1)
    params = est["params"]
    assert params == count_parameters(build_contrastive_model(cfg))
    assert est["weights"] == 4 * params and est["grads"] == 4 * params and est["optimizer_states"] == 4 * params
    assert est["activations_per_block"] == 2 * 17 * 8 * 32 * 34
    assert est["activations"] == 2 * est["activations_per_block"]
    zero3 = estimate_memory(cfg, 4, 2, "bf16", 3, 4, optimizer="adamw")
    assert zero3["weights"] == 2 * params / 4 and zero3["optimizer_states"] == 12 * params / 4
    ckpt = estimate_memory(dataclasses.replace(cfg, activation_checkpointing="timm"), 4, 2, "fp32", 0, 1)
    assert ckpt["activations"] == 2 * 4 * 17 * 8 * 32 + ckpt["activations_per_block"]
    big = load_config(REPO / "configs" / "vit_h14.yaml").model
    none = estimate_memory(dataclasses.replace(big, activation_checkpointing="none"), 64, 2, "bf16", 2, 8)
    timm_ckpt = estimate_memory(big, 64, 2, "bf16", 2, 8)
    assert timm_ckpt["activations"] < none["activations"] / 10
