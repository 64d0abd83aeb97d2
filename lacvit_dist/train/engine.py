"""The DeepSpeed engine built from a Config: its JSON config (ZeRO stage, precision and gradient dtypes,
clipping, accumulation, batch arithmetic), the optimizer and LR schedule, and torch.compile."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import deepspeed
import timm.optim
import torch
from torch.optim.lr_scheduler import LambdaLR

from lacvit_dist.config import Config, ConfigError, DeepSpeedConfig, StageConfig, deep_merge


BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def deepspeed_config(cfg: Config, stage: StageConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config from ours, with the user's deepspeed.config_file (if any) merged over it."""
    generated = _generated_deepspeed_config(cfg, stage, world_size)
    if cfg.deepspeed.config_file is None:
        return generated
    path = Path(cfg.deepspeed.config_file)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"deepspeed.config_file: cannot read {path}: {err}") from None
    for key in BATCH_KEYS:
        if key in user and user[key] != generated[key]:
            raise ConfigError(f"deepspeed.config_file: {path} sets {key}={user[key]}, but the stage's batch "
                              f"settings give {generated[key]}; set micro_batch_size / grad_accum_steps instead")
    if "optimizer" in user or "scheduler" in user:
        raise ConfigError(f"deepspeed.config_file: {path} defines optimizer/scheduler; they come from the "
                          f"stage's optimizer section (timm's param groups, warmup + cosine)")
    merged = deep_merge(generated, user)
    offload = merged.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device", "none") != "none":
        raise ConfigError(
            f"deepspeed.config_file: {path} sets zero_optimization.offload_optimizer (device "
            f"{offload['device']!r}), which DeepSpeed runs only with its own C++ CPU Adam, not with the stage's "
            f"torch optimizer (timm's parameter groups, SGD or AdamW). Remove offload_optimizer and fit memory "
            f"with deepspeed.zero_stage=3, model.activation_checkpointing, or a "
            f"smaller micro_batch_size with more grad_accum_steps (stage1.accumulation=enlarge_contrast keeps "
            f"the contrast set)")
    if merged["bf16"].get("enabled") and merged["bf16"].get("check_grad_overflow") is False:
        raise ConfigError(f"deepspeed.config_file: {path} sets bf16.check_grad_overflow=false; the non-finite "
                          "step guard relies on DeepSpeed skipping steps with non-finite gradients under bf16")
    return merged


def _generated_deepspeed_config(cfg: Config, stage: StageConfig, world_size: int) -> dict[str, Any]:
    precision = cfg.deepspeed.precision
    generated = {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum_steps,
        "train_batch_size": stage.micro_batch_size * stage.grad_accum_steps * world_size,
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Our optimizers are torch's (timm's factory); ZeRO accepts them with this flag.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        generated.update(_bf16_gradient_dtypes(cfg.deepspeed, stage))
    return generated


def _bf16_gradient_dtypes(ds: DeepSpeedConfig, stage: StageConfig) -> dict[str, Any]:
    """Where bf16 gradients are reduced and summed (config.DeepSpeedConfig.grad_*_dtype). ZeRO-0 can only sum
    in bf16 (validated at load time when a stage accumulates); with one micro-batch per step nothing is summed."""
    accumulate_fp32 = ds.grad_accum_dtype == "fp32" and ds.zero_stage >= 1
    return {"communication_data_type": "fp32" if ds.grad_reduce_dtype == "fp32" else "bf16",
            "data_types": {"grad_accum_dtype": "fp32" if accumulate_fp32 else "bf16"}}


def gradient_dtypes(engine) -> str:
    """'gradients reduced in X, accumulated in Y' for the start-up summary, read off the running engine."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return (f"gradients reduced in {name[engine.communication_data_type]}, accumulated in "
            f"{name[engine.get_data_types()[1]]}")


def build_optimizer(model: torch.nn.Module, stage: StageConfig, total_steps: int):
    """timm's optimizer factory (no weight decay on norms, biases, pos-embed, cls token; frozen params left
    out) and a per-optimizer-step linear warmup + cosine schedule."""
    opt = stage.optimizer
    kwargs: dict[str, Any] = {"momentum": opt.momentum} if opt.name == "sgd" else {"betas": tuple(opt.betas)}
    # timm's "sgd" is Nesterov; the paper's is plain momentum SGD.
    if opt.name == "adamw" and torch.cuda.is_available():
        kwargs["fused"] = True  # torch's fused CUDA kernel: no extension to JIT-compile
    optimizer = timm.optim.create_optimizer_v2(model, opt="momentum" if opt.name == "sgd" else "adamw",
                                               lr=opt.lr, weight_decay=opt.weight_decay,
                                               layer_decay=opt.layer_decay, **kwargs)
    for group in optimizer.param_groups:  # timm's layer-decay scale, which torch's LambdaLR does not know
        group["lr"] = opt.lr * group.get("lr_scale", 1.0)

    def lr_factor(step: int) -> float:
        if step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        progress = min(1.0, (step - opt.warmup_steps) / max(1, total_steps - opt.warmup_steps))
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, LambdaLR(optimizer, lr_factor)


def initialize_engine(cfg: Config, stage: StageConfig, model: torch.nn.Module, optimizer, scheduler,
                      world_size: int):
    """The DeepSpeed engine around `model`, compiled with torch.compile if deepspeed.compile is set."""
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, stage, world_size), dist_init_required=False)
    if cfg.deepspeed.compile:
        engine.compile(backend=cfg.deepspeed.compile_backend)  # in place: state-dict keys are unchanged
    return engine
