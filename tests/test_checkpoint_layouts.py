"""Local pretrained weights (model.pretrained_path) in the timm / MAE / SimMIM / data2vec (BEiT) layouts, loaded
through timm's own checkpoint filters into vit_* (absolute position embeddings) or beit_* (relative position
bias) models. Each checkpoint is built here from a tiny timm model with known, non-trivial weights, its keys
renamed to the layout's names; after loading, every weight must equal its source (or timm's resampling of it),
and every weight that would be dropped or left random is an error naming the keys and the file."""
import dataclasses
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

from lacvit_dist.config import ModelConfig, load_config
from lacvit_dist.models.factory import build_contrastive_model, create_backbone
from lacvit_dist.models.layouts import detect_checkpoint_format, load_pretrained_backbone
from lacvit_dist.models.memory import estimate_memory

REPO = Path(__file__).resolve().parent.parent
TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def cfg(name="vit_tiny_patch16_224", img_size=32, path=None, **kwargs) -> ModelConfig:
    overrides = dict(TINY, img_size=img_size, **kwargs.pop("overrides", {}))
    return ModelConfig(name=name, overrides=overrides, pretrained_path=None if path is None else str(path), **kwargs)


def randomised(model):
    with torch.no_grad():  # non-trivial values everywhere, so that a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def vit_source(**kwargs):
    torch.manual_seed(1)
    return randomised(timm.create_model("vit_tiny_patch16_224", num_classes=0, **dict(TINY, img_size=32, **kwargs)))


def beit_source(**kwargs):
    """timm's BEiT at 32 px with one relative position table shared by all blocks, as BEiT / data2vec / SimMIM
    pre-train (no absolute position embeddings, layer scale 0.1)."""
    torch.manual_seed(2)
    return randomised(timm.create_model("beit_base_patch16_224", num_classes=0, global_pool="token", **dict(
        TINY, img_size=32, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **kwargs)))


def clone(src) -> dict:
    return {k: v.clone() for k, v in src.state_dict().items()}


def save(state: dict, path, wrap: str | None = "model"):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({wrap: state, "epoch": 799} if wrap else state, path)
    return path


def mae_layout(src) -> dict:
    """facebookresearch/mae MaskedAutoencoderViT: encoder keys as timm, + mask_token, decoder_*."""
    d = 16
    return {**clone(src), "mask_token": torch.randn(1, 1, d), "decoder_embed.weight": torch.randn(d, 32),
            "decoder_pos_embed": torch.randn(1, 65, d), "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * d, d),
            "decoder_norm.weight": torch.randn(d), "decoder_pred.weight": torch.randn(4 * 4 * 3, d)}


def beit_style(src) -> dict:
    """A timm ViT with layer scale in BEiT's names: q_bias + v_bias instead of qkv.bias, gamma_1/2 for ls1/ls2."""
    out = {}
    for key, value in src.state_dict().items():
        if key.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3)
            assert torch.all(k == 0)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q.clone(), v.clone()
        else:
            out[key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value.clone()
    return out


def beit_ape_source():
    src = vit_source(init_values=0.1)  # SimMIM / data2vec with absolute position embeddings (USE_APE)
    with torch.no_grad():  # BEiT-style attention has no key bias
        for blk in src.blocks:
            blk.attn.qkv.bias[32:64].zero_()
    return src


def simmim_layout(encoder: dict) -> dict:
    """microsoft/SimMIM: the encoder under "encoder.", its mask token, a conv + pixel-shuffle decoder."""
    return {**{"encoder." + k: v for k, v in encoder.items()}, "encoder.mask_token": torch.randn(1, 1, 32),
            "decoder.0.weight": torch.randn(48, 32, 1, 1), "decoder.0.bias": torch.randn(48)}


def assert_loaded(model, expected: dict, skip=()):
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        if key not in skip:
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------------------ timm / MAE
def test_timm_layout_resampled_by_timm_and_strict(tmp_path):
    src = vit_source()
    path = save(clone(src), tmp_path / "tiny.safetensors")
    model = create_backbone(cfg(img_size=16, path=path))  # auto -> timm
    expected = resample_abs_pos_embed(src.state_dict()["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.state_dict()["pos_embed"], expected)
    assert_loaded(model, clone(src), skip={"pos_embed"})
    # timm's own file loading would leave a missing block weight random (non-strict with another head): refused
    state = clone(src)
    del state["blocks.1.mlp.fc1.weight"]
    broken = save(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken\.safetensors.*blocks\.1\.mlp\.fc1\.weight"):
        create_backbone(cfg(path=broken))


def test_mae_layout_avg_pool_head_and_resampling(tmp_path):
    src = vit_source()  # token pool: has the final `norm`, as MAE's pre-training encoder
    path = save(mae_layout(src), tmp_path / "mae.pth")
    model = create_backbone(cfg(path=path, global_pool="avg"))
    expected = clone(src)
    expected["fc_norm.weight"], expected["fc_norm.bias"] = expected.pop("norm.weight"), expected.pop("norm.bias")
    assert_loaded(model, expected)  # timm avg pool: fc_norm on the pooled tokens, initialised from `norm`
    small = create_backbone(cfg(img_size=16, path=path, checkpoint_format="mae"))
    pos = resample_abs_pos_embed(src.state_dict()["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(small.state_dict()["pos_embed"], pos)
    assert_loaded(small, clone(src), skip={"pos_embed"})
    # an ImageNet head is dropped for a 5-class classifier, whose head starts fresh; the drops are reported
    state = {**mae_layout(src), "head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000)}
    assert detect_checkpoint_format(state) == "mae"
    classifier = timm.create_model("vit_tiny_patch16_224", num_classes=5, **dict(TINY, img_size=32))
    dropped = load_pretrained_backbone(classifier, state, source="mae.pth")
    assert {"mask_token", "decoder_pred.weight", "head.weight", "head.bias"} <= set(dropped)
    assert classifier.head.weight.shape == (5, 32)
    assert_loaded(classifier, {**clone(src), **{k: classifier.state_dict()[k] for k in ("head.weight", "head.bias")}})


def test_unknown_or_missing_keys_are_errors_naming_file_and_keys(tmp_path):
    src = vit_source()
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **dict(TINY, img_size=32))
    with pytest.raises(ValueError, match=r"mae\.pth.*no place for: \['blocks\.0\.extra\.weight'\]"):
        load_pretrained_backbone(model, {**mae_layout(src), "blocks.0.extra.weight": torch.zeros(3)}, source="mae.pth")
    state = mae_layout(src)
    del state["cls_token"]
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['cls_token'\]"):
        load_pretrained_backbone(model, state, source="mae.pth")
    state = mae_layout(src)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight \(64, 32\) vs model \(128, 32\)"):
        load_pretrained_backbone(model, state, source="mae.pth")


# ---------------------------------------------------------------------- SimMIM / data2vec, absolute positions
def test_simmim_and_data2vec_absolute_positions_into_vit(tmp_path):
    src = beit_ape_source()
    simmim = save(simmim_layout(beit_style(src)), tmp_path / "simmim.pth")
    assert_loaded(create_backbone(cfg(path=simmim, overrides={"init_values": 0.1})), clone(src))
    d2v = {"module." + k: v for k, v in beit_style(src).items()}  # a DDP-wrapped data2vec file
    d2v.update({"module.mask_token": torch.randn(1, 1, 32), "module.lm_head.weight": torch.randn(8, 32)})
    d2v_path = save(d2v, tmp_path / "d2v.pth", wrap="module")
    assert_loaded(create_backbone(cfg(path=d2v_path, overrides={"init_values": 0.1}, checkpoint_format="data2vec")),
                  clone(src))
    # without layer scale in the model the gammas have nowhere to go: an error, with the hint
    with pytest.raises(ValueError, match=r"simmim\.pth \(simmim layout\).*gamma.*init_values"):
        create_backbone(cfg(path=simmim))


# -------------------------------------------------------------------- relative position bias: beit_* models
def test_relative_position_bias_loads_into_beit_and_resizes(tmp_path):
    src = beit_source()
    state = clone(src)
    assert detect_checkpoint_format(state) == "data2vec"
    state.update({"mask_token": torch.randn(1, 1, 32), "lm_head.weight": torch.randn(8, 32),
                  "rel_pos_bias.relative_position_index": src.rel_pos_bias.relative_position_index.clone()})
    path = save(state, tmp_path / "data2vec.safetensors")
    # a model that shares the table, like the checkpoint
    shared = create_backbone(cfg("beit_base_patch16_224", path=path, global_pool="token",
                                 overrides={"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}))
    assert_loaded(shared, clone(src))
    # beit_base_patch16_224 as timm defines it: one table per block, each a copy of the shared one
    per_block = create_backbone(cfg("beit_base_patch16_224", path=path, global_pool="token"))
    expected = clone(src)
    table = expected.pop(SHARED_TABLE)
    expected.update({f"blocks.{i}.attn.relative_position_bias_table": table for i in range(2)})
    assert_loaded(per_block, expected)
    # at 16 px (a 4x4 grid instead of 8x8) timm resizes the tables; everything else is unchanged
    small = create_backbone(cfg("beit_base_patch16_224", img_size=16, path=path, global_pool="token"))
    resized = resize_rel_pos_bias_table(table, new_window_size=(4, 4), new_bias_shape=(7 * 7 + 3, 2))
    assert resized.shape == (52, 2) and table.shape == (15 * 15 + 3, 2)
    tables = {f"blocks.{i}.attn.relative_position_bias_table" for i in range(2)}
    for key in tables:
        torch.testing.assert_close(small.state_dict()[key], resized, msg=key)
    assert_loaded(small, expected, skip=tables)
    # the released SimMIM ViT-B layout: the same encoder under "encoder.", with a decoder
    simmim = save(simmim_layout(clone(src)), tmp_path / "simmim.pth")
    assert_loaded(create_backbone(cfg("beit_base_patch16_224", path=simmim, global_pool="token")), expected)


def test_position_layout_and_model_mismatches_name_the_fix(tmp_path):
    rel = save(clone(beit_source()), tmp_path / "rel.safetensors")
    # relative position bias with a vit_* model: the error names the beit_* model to use, and the file
    with pytest.raises(ValueError, match=r"rel\.safetensors.*relative position bias.*model\.name: beit_base_patch16_224"):
        create_backbone(cfg("vit_base_patch16_224", path=rel))
    with pytest.raises(ValueError, match=r"rel\.safetensors.*use_rel_pos_bias"):
        create_backbone(cfg("beit_base_patch16_224", path=rel, overrides={"use_rel_pos_bias": False}))
    # absolute position embeddings (MAE) with a beit_* model that has none
    mae = save(mae_layout(vit_source()), tmp_path / "mae.pth")
    with pytest.raises(ValueError, match=r"mae\.pth.*pos_embed.*use a vit_\* model"):
        create_backbone(cfg("beit_base_patch16_224", path=mae))


# ----------------------------------------------- stage 1 with a beit_* backbone: head, checkpointing, memory
def _beit_grads(base: ModelConfig, mode: str, offload: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_contrastive_model(dataclasses.replace(base, activation_checkpointing=mode,
                                                        checkpoint_offload=offload)).double().train()
    views = torch.randn(2, 2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)  # drop-path draws: the recompute must replay them
    model(views).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_stage1_beit_backbone_from_config_checkpointing_and_memory(tmp_path):
    src = beit_source()
    path = save(clone(src), tmp_path / "data2vec.safetensors")
    # the demo config (16 px, global_pool avg: the checkpoint's final norm becomes fc_norm) with a beit_* model
    base = load_config(REPO / "configs" / "demo_digits.yaml", [
        "model.name=beit_base_patch16_224", f"model.pretrained_path={path}", "model.drop_path_rate=0.1",
        *(f"model.overrides.{k}={v}" for k, v in TINY.items())]).model
    assert base.global_pool == "avg" and base.overrides["img_size"] == 16
    backbone = build_contrastive_model(base).backbone
    torch.testing.assert_close(backbone.fc_norm.weight, src.norm.weight, rtol=0, atol=0)
    reference = _beit_grads(base, "none")
    assert any(n.endswith("relative_position_bias_table") for n in reference)
    for mode, offload in (("timm", False), ("fairscale", True)):
        grads = _beit_grads(base, mode, offload)
        assert set(grads) == set(reference)
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=f"{mode} {name}")
    est = estimate_memory(base, micro_batch=4, views=2, precision="fp32", zero_stage=0, world_size=1)
    assert (est["tokens"], est["heads"], est["depth"], est["width"]) == (17, 2, 2, 32)
    assert est["activations_per_block"] == 2 * 17 * 8 * 32 * 34
