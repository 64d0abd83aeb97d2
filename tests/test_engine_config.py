"""What the engine builds from the config: DeepSpeed's config (with a user's file merged), optimizer groups
(weight-decay exclusions, layer-wise lr decay) and the per-optimizer-step warmup + cosine schedule."""
import json
import math

import pytest

from lacvit_dist.config import ConfigError, load_config
from lacvit_dist.train.engine import build_optimizer, deepspeed_config
from lacvit_dist.models.factory import build_classifier

TINY = ["model.name=vit_tiny_patch16_224", "model.overrides.img_size=16", "model.overrides.patch_size=4",
        "model.overrides.embed_dim=32", "model.overrides.depth=3", "model.overrides.num_heads=2"]


def test_generated_deepspeed_config():
    cfg = load_config(None, ["stage1.micro_batch_size=8", "stage1.grad_accum_steps=4", "deepspeed.zero_stage=2",
                             "deepspeed.precision=bf16", "deepspeed.gradient_clipping=0.5"])
    ds = deepspeed_config(cfg, cfg.stage1, world_size=16)
    assert ds["train_batch_size"] == 8 * 4 * 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": True}
    assert ds["fp16"] == {"enabled": False} and ds["gradient_clipping"] == 0.5
    # bf16 gradients are reduced and summed in fp32 unless asked otherwise (tests/test_bf16_gradients.py).
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    model_dtypes = load_config(None, ["deepspeed.zero_stage=2", "deepspeed.precision=bf16",
                                      "deepspeed.grad_reduce_dtype=model", "deepspeed.grad_accum_dtype=model"])
    ds = deepspeed_config(model_dtypes, model_dtypes.stage1, world_size=2)
    assert ds["communication_data_type"] == "bf16" and ds["data_types"] == {"grad_accum_dtype": "bf16"}
    fp32 = deepspeed_config(load_config(None, []), cfg.stage1, world_size=2)
    assert "communication_data_type" not in fp32 and "data_types" not in fp32


def test_bf16_zero0_sums_in_bf16_only_without_accumulation():
    """DeepSpeed's ZeRO-0 bf16 path cannot sum in fp32: with one micro-batch per step nothing is summed; with
    several, the config names the fix instead of failing inside deepspeed.initialize."""
    cfg = load_config(None, ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"])
    ds = deepspeed_config(cfg, cfg.stage1, world_size=2)
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "bf16"}
    with pytest.raises(ConfigError, match="deepspeed.grad_accum_dtype: .*stage1.grad_accum_steps is 4.*zero_stage=1"):
        load_config(None, ["deepspeed.zero_stage=0", "deepspeed.precision=bf16", "stage1.grad_accum_steps=4"])
    load_config(None, ["deepspeed.zero_stage=0", "deepspeed.precision=bf16", "stage1.grad_accum_steps=4",
                       "deepspeed.grad_accum_dtype=model"])


def test_optimizer_offload_refused_with_the_way_out(tmp_path):
    user = tmp_path / "offload.json"
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True}}}))
    cfg = load_config(None, ["deepspeed.zero_stage=2", f"deepspeed.config_file={user}"])
    with pytest.raises(ConfigError, match=r"offload.json sets zero_optimization.offload_optimizer .*'cpu'.*"
                                          r"zero_stage=3.*activation_checkpointing"):
        deepspeed_config(cfg, cfg.stage1, world_size=2)
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "none"}}}))
    deepspeed_config(cfg, cfg.stage1, world_size=2)


def test_user_deepspeed_file_merged_and_checked(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e8}, "train_micro_batch_size_per_gpu": 8}))
    cfg = load_config(None, ["stage1.micro_batch_size=8", "deepspeed.zero_stage=1", f"deepspeed.config_file={user}"])
    ds = deepspeed_config(cfg, cfg.stage1, world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 5e8}
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="deepspeed.config_file: .* train_micro_batch_size_per_gpu=16.* give 8"):
        deepspeed_config(cfg, cfg.stage1, world_size=2)
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="defines optimizer"):
        deepspeed_config(cfg, cfg.stage1, world_size=2)
    user.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        deepspeed_config(cfg, cfg.stage1, world_size=2)
    # The non-finite guard trusts DeepSpeed's bf16 overflow check: switching it off is refused.
    user.write_text(json.dumps({"bf16": {"check_grad_overflow": False}}))
    bf16 = load_config(None, ["stage1.micro_batch_size=8", "deepspeed.precision=bf16", f"deepspeed.config_file={user}"])
    with pytest.raises(ConfigError, match="check_grad_overflow"):
        deepspeed_config(bf16, bf16.stage1, world_size=2)
    assert deepspeed_config(cfg, cfg.stage1, world_size=2)["bf16"] == {"enabled": False, "check_grad_overflow": False}


def test_optimizer_groups_weight_decay_and_layer_decay():
    cfg = load_config(None, TINY + ["baseline.optimizer.name=adamw", "baseline.optimizer.lr=0.01",
                                    "baseline.optimizer.weight_decay=0.05", "baseline.optimizer.layer_decay=0.5"])
    model = build_classifier(cfg.model, num_classes=5)
    optimizer, _ = build_optimizer(model, cfg.baseline, total_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert set(lr_of) == set(names.values())  # every parameter in exactly one group
    assert lr_of["head.weight"] == (pytest.approx(0.01), 0.05)
    assert lr_of["head.bias"][1] == 0.0 and lr_of["blocks.0.norm1.weight"][1] == 0.0  # no decay on norms/biases
    assert lr_of["pos_embed"][1] == 0.0 and lr_of["cls_token"][1] == 0.0
    # depth 3: the embedding is layer 0 of 5 (embed, 3 blocks, head): lr x 0.5^4; block i: 0.5^(3 - i)
    assert lr_of["patch_embed.proj.weight"][0] == pytest.approx(0.01 * 0.5 ** 4)
    assert lr_of["blocks.2.mlp.fc1.weight"][0] == pytest.approx(0.01 * 0.5)


def test_warmup_then_cosine_per_optimizer_step():
    cfg = load_config(None, TINY + ["stage2.optimizer.lr=1.0", "stage2.optimizer.warmup_steps=4",
                                    "stage2.optimizer.min_lr_ratio=0.1"])
    model = build_classifier(cfg.model, num_classes=5)
    optimizer, scheduler = build_optimizer(model, cfg.stage2, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] > 0.1
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way through the cosine
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
