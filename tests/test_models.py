"""Model factory: ViT-B/L/H presets (built on the meta device), local pretrained weights in timm / MAE / SimMIM /
data2vec layouts (round trip, position-embedding resampling, a dropped backbone weight is an error),
activation checkpointing (gradients unchanged) and the memory estimate."""
import dataclasses
import resource
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from lacvit_dist.config import ConfigError, ModelConfig, load_config
from lacvit_dist.models import (apply_activation_checkpointing, build_classifier, build_contrastive_model,
                                count_parameters, create_backbone, detect_checkpoint_format, estimate_memory,
                                load_pretrained_backbone)

REPO = Path(__file__).resolve().parent.parent
TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def tiny_cfg(img_size=32, **kwargs) -> ModelConfig:
    overrides = dict(TINY, img_size=img_size, **kwargs.pop("overrides", {}))
    return ModelConfig(name="vit_tiny_patch16_224", overrides=overrides, **kwargs)


def tiny_vit(img_size=32, global_pool="token", **kwargs):
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool=global_pool,
                              **dict(TINY, img_size=img_size, **kwargs))
    with torch.no_grad():  # non-trivial values everywhere, so that a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


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


# ------------------------------------------------------------------------------------------ timm weights
def test_timm_checkpoint_resampled_by_timm(tmp_path):
    src = tiny_vit(img_size=32)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = create_backbone(tiny_cfg(img_size=16, pretrained_path=str(path)))  # auto -> timm
    got, ref = model.state_dict(), src.state_dict()
    assert got["pos_embed"].shape == (1, 17, 32)
    expected = resample_abs_pos_embed(ref["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(got["pos_embed"], expected)
    for key in ref:
        if key != "pos_embed":
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ MAE / SimMIM / data2vec
def mae_checkpoint(src) -> dict:
    """facebookresearch/mae MaskedAutoencoderViT layout: encoder keys as timm, + mask_token, decoder_*."""
    d = 16
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state.update({"mask_token": torch.randn(1, 1, d), "decoder_embed.weight": torch.randn(d, 32),
                  "decoder_embed.bias": torch.randn(d), "decoder_pos_embed": torch.randn(1, 65, d),
                  "decoder_blocks.0.norm1.weight": torch.randn(d), "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * d, d),
                  "decoder_norm.weight": torch.randn(d), "decoder_pred.weight": torch.randn(4 * 4 * 3, d)})
    return {"model": state}


def beit_layout(src) -> dict:
    """BEiT-style encoder keys (SimMIM / data2vec): q_bias + v_bias instead of qkv.bias, gamma_1/2 for ls."""
    out = {}
    for key, value in src.state_dict().items():
        if key.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3)
            assert torch.all(k == 0)
            out[key.replace("qkv.bias", "q_bias")] = q.clone()
            out[key.replace("qkv.bias", "v_bias")] = v.clone()
        elif key.endswith(("ls1.gamma", "ls2.gamma")):
            out[key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value.clone()
        else:
            out[key] = value.clone()
    return out


def beit_source():
    src = tiny_vit(img_size=32, init_values=0.1)
    with torch.no_grad():  # BEiT-style attention has no key bias
        for blk in src.blocks:
            blk.attn.qkv.bias[32:64].zero_()
    return src


def assert_same_backbone(model, src, skip=()):
    got, ref = model.state_dict(), src.state_dict()
    assert set(got) == set(ref)
    for key in ref:
        if key not in skip:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, msg=key)


def test_mae_round_trip_avg_pool_and_resampling(tmp_path):
    src = tiny_vit(img_size=32)  # token pool: has the final `norm`, as MAE's pre-training encoder
    path = tmp_path / "mae.pth"
    torch.save(mae_checkpoint(src), path)
    model = create_backbone(tiny_cfg(img_size=32, pretrained_path=str(path), global_pool="avg"))
    got = model.state_dict()
    assert "norm.weight" not in got  # timm avg pool: fc_norm on the pooled tokens, initialised from `norm`
    torch.testing.assert_close(got["fc_norm.weight"], src.state_dict()["norm.weight"], rtol=0, atol=0)
    for key, value in src.state_dict().items():
        if not key.startswith("norm."):
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    # at another resolution the position embeddings are resampled, nothing else changes
    small = create_backbone(tiny_cfg(img_size=16, pretrained_path=str(path), checkpoint_format="mae"))
    expected = resample_abs_pos_embed(src.state_dict()["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(small.state_dict()["pos_embed"], expected)
    assert_same_backbone(small, src, skip={"pos_embed"})


def test_mae_report_and_classifier(tmp_path):
    src = tiny_vit(img_size=32)
    state = mae_checkpoint(src)["model"]
    state["head.weight"], state["head.bias"] = torch.randn(1000, 32), torch.randn(1000)  # an ImageNet head
    assert detect_checkpoint_format(state) == "mae"
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **dict(TINY, img_size=32))
    report = load_pretrained_backbone(model, state, "mae", source="mae.pth")
    assert "mask_token" in report.dropped and "decoder_pred.weight" in report.dropped
    assert "head.weight" in report.dropped and report.missing_head == ["head.bias", "head.weight"]
    assert model.head.weight.shape == (5, 32)


def test_simmim_round_trip(tmp_path):
    src = beit_source()
    state = {"encoder." + k: v for k, v in beit_layout(src).items()}
    state.update({"encoder.mask_token": torch.randn(1, 1, 32), "decoder.0.weight": torch.randn(16 * 16 * 3, 32, 1, 1),
                  "decoder.0.bias": torch.randn(16 * 16 * 3)})
    path = tmp_path / "simmim.pth"
    torch.save({"model": state, "epoch": 799}, path)
    model = create_backbone(tiny_cfg(img_size=32, pretrained_path=str(path), overrides={"init_values": 0.1}))
    assert_same_backbone(model, src)
    assert detect_checkpoint_format(state) == "simmim"
    # without layer scale in the model, the gammas have nowhere to go: an error, with the hint
    with pytest.raises(ValueError, match="init_values"):
        create_backbone(tiny_cfg(img_size=32, pretrained_path=str(path), checkpoint_format="simmim"))


def test_data2vec_round_trip_and_relative_position_bias_refused(tmp_path):
    src = beit_source()
    state = beit_layout(src)
    state.update({"mask_token": torch.randn(1, 1, 32), "lm_head.weight": torch.randn(8, 32)})
    assert detect_checkpoint_format(state) == "data2vec"
    path = tmp_path / "d2v.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_backbone(tiny_cfg(img_size=32, pretrained_path=str(path), overrides={"init_values": 0.1}))
    assert_same_backbone(model, src)
    state["rel_pos_bias.relative_position_bias_table"] = torch.randn(15 * 15 + 3, 2)
    target = timm.create_model("vit_tiny_patch16_224", num_classes=0, **dict(TINY, img_size=32, init_values=0.1))
    with pytest.raises(ValueError, match="relative position bias"):
        load_pretrained_backbone(target, state, "data2vec")


def test_missing_backbone_key_is_an_error(tmp_path):
    src = tiny_vit(img_size=32)
    ckpt = mae_checkpoint(src)
    del ckpt["model"]["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        create_backbone(tiny_cfg(img_size=32, pretrained_path=str(path)))
    ckpt = mae_checkpoint(src)
    ckpt["model"]["blocks.0.extra.weight"] = torch.zeros(3)  # unknown key: not silently ignored either
    with pytest.raises(ValueError, match=r"blocks\.0\.extra\.weight"):
        load_pretrained_backbone(timm.create_model("vit_tiny_patch16_224", num_classes=0, **dict(TINY, img_size=32)),
                                 ckpt["model"], "mae")


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
