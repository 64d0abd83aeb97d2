"""Model size and the start-up memory estimate (parameters, gradients, optimizer state under each ZeRO stage,
activations with and without checkpointing, the contrastive loss's logits), from a model built on the meta
device."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lacvit_dist.config import ModelConfig
from lacvit_dist.models.factory import build_contrastive_model, create_backbone

def meta_model(cfg: ModelConfig, contrastive: bool = True) -> nn.Module:
    """The model built on the meta device: shapes only, no memory, no weights read."""
    cfg = dataclasses.replace(cfg, pretrained_path=None)
    with torch.device("meta"):
        return build_contrastive_model(cfg) if contrastive else create_backbone(cfg)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Real parameter count, also under ZeRO-3 (whose partitioned parameters hold 0 elements locally and
    keep their full size in `ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad or not trainable_only)


GIB = 1024 ** 3
# Optimizer-state bytes per parameter (fp32 master copy under bf16/fp16 included): ZeRO paper's K.
_OPTIMIZER_BYTES = {("sgd", "fp32"): 4, ("adamw", "fp32"): 8, ("sgd", "mixed"): 8, ("adamw", "mixed"): 12}


def estimate_memory(model_cfg: ModelConfig, micro_batch: int, views: int, precision: str, zero_stage: int,
                    world_size: int, *, optimizer: str = "sgd", fused_attention: bool = True,
                    accumulation_steps: int = 1, enlarge_contrast: bool = True) -> dict[str, Any]:
    """Per-GPU memory estimate (bytes, and GiB under "*_gib") for one training step of the stage-1 model.

    Parameters P (backbone + projection head, counted on the meta device), Psi = P:
      weights      w * P / (world if ZeRO-3)                    w = 2 (bf16/fp16) or 4 (fp32)
      gradients    w * P / (world if ZeRO >= 2)
      optimizer    K * P / (world if ZeRO >= 1)                 K = 4 SGD-momentum / 8 AdamW in fp32;
                                                                K = 8 / 12 in bf16/fp16 (fp32 master + states)
    Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    per block for a pre-norm block with MLP ratio r = 4, in 2-byte units; a = activation bytes 2 or 4):
      one block    (a / 2) * T * b * d * (34 + 5 * h * T / d)   T tokens (patches + prefix), b = micro_batch x
                                                                views images through the encoder, d width,
                                                                h heads; the 5hT/d term (attention matrix) is
                                                                0 with fused attention (SDPA / flash)
      none         depth x one block
      timm/fairscale  depth x (a * T * b * d) (the saved block inputs; 0 on the GPU with fairscale offload)
                   + one block (recomputed during backward)
    plus the input images of one micro-batch (a * b * 3 * H * W: micro-batches reach the device one at a
    time) and the contrastive loss: about 20 bytes per element of the anchors x contrast-set logit matrix
    (measured, losses.supcon_rows). Without accumulation that is b local views x b * world views. With
    `enlarge_contrast` over k micro-batches (lacvit_dist.train.feature_cache) every recompute takes the loss of all
    k micro-batches, k * b anchors x k * b * world views (k^2 times larger), keeps k micro-batches of
    projections cached (a * k * b * proj_dim) and gathers the contrast set's projections in fp32 (4 * k * b *
    world * proj_dim). One micro-batch's graph is alive at a time, so activations do not grow with k.
    `total` sums them; allocator fragmentation, CUDA context (~0.5-1 GiB), communication buckets and the
    data pipeline are not included, so treat it as a lower bound.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage!r}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be sgd or adamw, got {optimizer!r}")
    model = meta_model(model_cfg, contrastive=True)
    backbone = model.backbone
    params = count_parameters(model)
    w = 4 if precision == "fp32" else 2
    k = _OPTIMIZER_BYTES[optimizer, "fp32" if precision == "fp32" else "mixed"]
    n = max(1, world_size)
    weights = w * params / (n if zero_stage >= 3 else 1)
    grads = w * params / (n if zero_stage >= 2 else 1)
    opt_states = k * params / (n if zero_stage >= 1 else 1)

    images = micro_batch * views
    grid = backbone.patch_embed.grid_size
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    tokens = grid[0] * grid[1] + prefix
    width = backbone.embed_dim
    depth = len(backbone.blocks)
    heads = backbone.blocks[0].attn.num_heads
    attn_term = 0.0 if fused_attention else 5.0 * heads * tokens / width
    one_block = (w / 2) * tokens * images * width * (34.0 + attn_term)
    mode = model_cfg.activation_checkpointing
    if mode == "none":
        activations = depth * one_block
    else:
        saved = 0.0 if (mode == "fairscale" and model_cfg.checkpoint_offload) else depth * w * tokens * images * width
        activations = saved + one_block
    img_size = backbone.patch_embed.img_size
    inputs = w * images * 3 * img_size[0] * img_size[1]
    contrasted = accumulation_steps if enlarge_contrast else 1  # micro-batches in one contrast set
    contrast_set = images * n * contrasted
    loss = 20.0 * (images * contrasted) * contrast_set
    proj_dim = model.head.net[-1].out_features
    feature_cache = (w * contrasted * images + 4 * contrast_set) * proj_dim
    total = weights + grads + opt_states + activations + inputs + loss + feature_cache
    out: dict[str, Any] = {
        "params": params, "tokens": tokens, "width": width, "depth": depth, "heads": heads,
        "images_per_forward": images, "precision": precision, "zero_stage": zero_stage, "world_size": n,
        "optimizer": optimizer, "activation_checkpointing": mode, "accumulation_steps": accumulation_steps,
        "contrast_views": contrast_set, "feature_cache": feature_cache,
        "weights": weights, "grads": grads, "optimizer_states": opt_states, "activations": activations,
        "activations_per_block": one_block, "inputs": inputs, "loss": loss, "total": total,
    }
    for key in ("weights", "grads", "optimizer_states", "activations", "activations_per_block", "inputs", "loss",
                "feature_cache", "total"):
        out[f"{key}_gib"] = out[key] / GIB
    return out


def format_memory_estimate(est: dict[str, Any]) -> str:
    """One line for the start-up summary."""
    return (f"memory estimate per GPU ({est['precision']}, ZeRO {est['zero_stage']}, world {est['world_size']}, "
            f"{est['params'] / 1e6:.1f}M params, {est['images_per_forward']} images/forward, accumulation "
            f"{est['accumulation_steps']}, {est['contrast_views']} views in the contrast set, checkpointing "
            f"{est['activation_checkpointing']}): weights {est['weights_gib']:.2f} + grads {est['grads_gib']:.2f} + "
            f"optimizer {est['optimizer_states_gib']:.2f} + activations {est['activations_gib']:.2f} + inputs "
            f"{est['inputs_gib']:.2f} + loss {est['loss_gib']:.2f} + feature cache {est['feature_cache_gib']:.2f} = "
            f"{est['total_gib']:.2f} GiB (lower bound)")
