"""timm ViT backbones (any name, size overrides, local weights), the stage-1 projection head, and the
classifier used by stage 2 and the CE baseline (a timm model with its own head, so that the exported
state dict loads with `timm.create_model(name, checkpoint_path=..., num_classes=...)`).

Also: pretrained weights in the MAE / SimMIM / data2vec layouts (renamed to timm's keys, position embeddings
resampled, a dropped backbone weight is an error), per-block activation checkpointing (timm or fairscale),
and a start-up memory estimate (`estimate_memory`)."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_state_dict_file
from .config import ConfigError, ModelConfig
from .data.transforms import ImageStats

log = logging.getLogger(__name__)


def create_backbone(cfg: ModelConfig, num_classes: int = 0, *, checkpointing: bool = True) -> nn.Module:
    """A timm model; num_classes=0 gives the pooled embedding (CLS after the final norm, or mean of patch
    tokens + fc_norm when global_pool='avg'), num_classes>0 adds timm's linear head on top of it.

    Weights from cfg.pretrained_path: timm-format files through timm's own mechanism (position embeddings
    resampled, head dropped); MAE / SimMIM / data2vec files through `load_pretrained_backbone`.
    `checkpointing=False` ignores cfg.activation_checkpointing (a frozen backbone has no backward)."""
    if cfg.pretrained_path is not None and not Path(cfg.pretrained_path).is_file():
        raise FileNotFoundError(f"model.pretrained_path: {cfg.pretrained_path} does not exist")
    if cfg.checkpoint_offload and cfg.activation_checkpointing != "fairscale":
        raise ConfigError("model.checkpoint_offload: needs model.activation_checkpointing=fairscale, got "
                          f"{cfg.activation_checkpointing!r}")
    fmt = None
    if cfg.pretrained_path is not None:
        fmt = cfg.checkpoint_format
        if fmt == "auto":
            fmt = detect_checkpoint_format(_checkpoint_keys(cfg.pretrained_path))
            log.info("model.pretrained_path %s: detected %s layout", cfg.pretrained_path, fmt)
    by_timm = fmt == "timm"
    try:
        model = timm.create_model(
            cfg.name, num_classes=num_classes, global_pool=cfg.global_pool, drop_path_rate=cfg.drop_path_rate,
            # timm's own local-file mechanism: it resamples position embeddings and drops the head.
            pretrained=by_timm,
            pretrained_cfg_overlay=dict(file=cfg.pretrained_path) if by_timm else None,
            **cfg.overrides)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model.name: {err}") from None
        raise
    if fmt is not None and not by_timm:
        load_pretrained_backbone(model, load_state_dict_file(cfg.pretrained_path), fmt, source=cfg.pretrained_path)
    if checkpointing:
        apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.checkpoint_offload)
    return model


def image_stats(backbone: nn.Module) -> ImageStats:
    """Input size and normalisation the backbone expects (size from the built model, so overrides count)."""
    data_cfg = timm.data.resolve_model_data_config(backbone)
    size = getattr(getattr(backbone, "patch_embed", None), "img_size", None) or data_cfg["input_size"][1:]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageStats(img_size=int(size), mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]))


class ProjectionHead(nn.Module):
    """Linear(d, h) -> ReLU -> Linear(h, out), L2-normalised output (LACVIT.md, stage 1)."""

    def __init__(self, in_dim: int, hidden_dim: int | None, out_dim: int):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class ContrastiveModel(nn.Module):
    """Stage 1: backbone embedding -> projection head. forward([B, V, C, H, W]) -> [B, V, out]."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        batch, nviews = views.shape[:2]
        # All 2N views go through the encoder in one forward pass, as in the paper.
        z = self.head(self.backbone(views.flatten(0, 1)))
        return z.view(batch, nviews, -1)


def build_contrastive_model(cfg: ModelConfig) -> ContrastiveModel:
    backbone = create_backbone(cfg, num_classes=0)
    return ContrastiveModel(backbone, ProjectionHead(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim))


def head_parameter_names(classifier: nn.Module) -> set[str]:
    """State-dict keys of timm's classifier head (what a stage-1 backbone does not have)."""
    head = classifier.get_classifier()
    prefix = next(name for name, module in classifier.named_modules() if module is head)
    return {f"{prefix}.{key}" for key in head.state_dict()}


def load_backbone_into(classifier: nn.Module, backbone_state: dict[str, torch.Tensor], source: str) -> None:
    """Load a stage-1 backbone into a timm classifier; only the classifier head may be missing."""
    missing, unexpected = classifier.load_state_dict(backbone_state, strict=False)
    head_keys = head_parameter_names(classifier)
    really_missing = sorted(set(missing) - head_keys)
    if really_missing or unexpected:
        raise ValueError(f"{source}: backbone does not match model (missing {really_missing[:8]}"
                         f"{'...' if len(really_missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]})")


def build_classifier(cfg: ModelConfig, num_classes: int, backbone_path: str | None = None,
                     freeze_backbone: bool = False) -> nn.Module:
    """timm model with a linear head; optionally initialised from a stage-1 backbone and frozen but for the head."""
    model = create_backbone(cfg, num_classes=num_classes, checkpointing=not freeze_backbone)
    if backbone_path is not None:
        # safetensors, or a torch file read with weights_only=True: a user-supplied file runs no code.
        load_backbone_into(model, load_state_dict_file(backbone_path), backbone_path)
    if freeze_backbone:
        head_keys = head_parameter_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in head_keys)
    return model


# ------------------------------------------------------------------------------------------------------------
# Pretrained weights in other repositories' layouts
#
# What each layout looks like (read from the public code):
#   mae      facebookresearch/mae models_mae.py, MaskedAutoencoderViT saved as {"model": state_dict}: a timm
#            ViT encoder (cls_token, pos_embed (fixed sin-cos), patch_embed.proj, blocks.N.* with timm's Block
#            names, norm) plus mask_token and decoder_embed / decoder_pos_embed / decoder_blocks /
#            decoder_norm / decoder_pred. Its fine-tuned models (models_vit.py, global_pool) replace norm by
#            fc_norm and add head.
#   simmim   microsoft/SimMIM models/simmim.py: SimMIM(encoder=VisionTransformerForSimMIM, decoder=Conv2d +
#            PixelShuffle) saved as {"model": ...}: every encoder key under "encoder.", decoder under
#            "decoder.", encoder.mask_token. The encoder is BEiT-style (models/vision_transformer.py):
#            attn.qkv without bias plus attn.q_bias / attn.v_bias (the key bias is zero), layer scale
#            gamma_1 / gamma_2 (init_values), optional relative position bias (rel_pos_bias.* shared,
#            blocks.N.attn.relative_position_bias_table per block), optional absolute pos_embed, norm or
#            (use_mean_pooling) fc_norm. SimMIM's own load_pretrained strips "encoder." the same way.
#   data2vec facebookresearch/data2vec_vision (BEiT code base), {"model"|"module": ...}: the same BEiT-style
#            names without a prefix (blocks.N.attn.q_bias, gamma_1, rel_pos_bias.relative_position_bias_table,
#            mask_token, lm_head.* / norm for pre-training), as read by HF's
#            convert_data2vec_vision_original_pytorch_checkpoint_to_pytorch.py.
# timm's VisionTransformer has absolute position embeddings only: a checkpoint that needs relative position
# bias (the released SimMIM ViT-B and data2vec weights use a shared one and no pos_embed) cannot be
# represented and is refused with the keys named, rather than loaded with those weights silently missing.
# ------------------------------------------------------------------------------------------------------------
CHECKPOINT_FORMATS = ("timm", "mae", "simmim", "data2vec")
# Keys of pre-training-only parts that may be dropped: decoders, mask tokens, LM / classifier heads,
# recomputed index buffers. Anything else left over is a backbone weight and must load.
_DROPPABLE = re.compile(r"^(decoder[._]|mask_token$|lm_head\.|head\.|head_dist\.|.*relative_position_index$)")


def _checkpoint_keys(path: str | Path) -> list[str]:
    """The tensor names of a weights file (safetensors: from the header only, nothing read)."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(load_state_dict_file(path).keys())


def detect_checkpoint_format(keys) -> str:
    """Guess the layout of a state dict from its keys (see the table above); "timm" when nothing else fits."""
    keys = list(keys)
    if any(k.startswith("encoder.") for k in keys) and any(
            k.startswith("decoder.") or k == "encoder.mask_token" for k in keys):
        return "simmim"
    if any(k.startswith("decoder_") for k in keys):
        return "mae"
    if any(k.endswith((".q_bias", ".gamma_1")) or k.startswith("rel_pos_bias.") for k in keys):
        return "data2vec"
    if any(k.startswith("data2vec_vision.") for k in keys):
        return "data2vec"
    return "timm"


@dataclasses.dataclass
class LoadReport:
    """What load_pretrained_backbone did: every key accounted for."""
    format: str
    loaded: list[str]
    renamed: dict[str, str]      # checkpoint key -> model key (after prefix stripping)
    dropped: list[str]           # pre-training-only keys left out (decoder, mask token, head ...)
    missing_head: list[str]      # model keys not in the checkpoint that may start fresh (classifier head)
    resampled: list[str]         # position / patch embeddings resampled to the model's grid

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded ({self.format} layout)"]
        if self.renamed:
            parts.append(f"{len(self.renamed)} renamed")
        if self.resampled:
            parts.append(f"resampled {self.resampled}")
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} pre-training-only keys {_short(self.dropped)}")
        if self.missing_head:
            parts.append(f"fresh head {self.missing_head}")
        return "; ".join(parts)


def _short(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return str(keys[:n])[:-1] + (f", ... {len(keys) - n} more]" if len(keys) > n else "]")


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix` lose it; others (e.g. a SimMIM decoder) are kept as they are (then dropped)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _beit_to_timm_vit(state: dict[str, torch.Tensor], renamed: dict[str, str]) -> dict[str, torch.Tensor]:
    """BEiT-style encoder keys -> timm VisionTransformer keys: q_bias / v_bias -> qkv.bias (zero key bias),
    gamma_1 / gamma_2 -> ls1.gamma / ls2.gamma (timm's layer scale, model.overrides.init_values)."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".attn.q_bias")]:
        block = key[:-len(".q_bias")]
        q, v = out.pop(key), out.pop(f"{block}.v_bias", None)
        if v is None:
            raise ValueError(f"{key} without {block}.v_bias: not a BEiT/SimMIM/data2vec attention layout")
        out[f"{block}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        renamed[f"{block}.q_bias+v_bias"] = f"{block}.qkv.bias"
    for key in [k for k in state if re.search(r"\.gamma_[12]$", k)]:
        new = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)
        out[new] = out.pop(key)
        renamed[key] = new
    return out


def _pool_norm(state: dict[str, torch.Tensor], model_keys: set[str], renamed: dict[str, str]) -> None:
    """A pre-training checkpoint has the final `norm` (applied to every token); timm with global_pool='avg'
    has no `norm` but an `fc_norm` on the pooled tokens (and the reverse for fine-tuned mean-pooling
    checkpoints loaded into a CLS-token model). The checkpoint's final norm initialises the model's one
    (MAE's own fine-tuning starts fc_norm fresh instead; its pretrained scale and shift are kept here)."""
    for src, dst in (("norm", "fc_norm"), ("fc_norm", "norm")):
        if (f"{src}.weight" in state and f"{src}.weight" not in model_keys and f"{dst}.weight" in model_keys
                and f"{dst}.weight" not in state):
            for suffix in (".weight", ".bias"):
                if f"{src}{suffix}" in state:
                    state[f"{dst}{suffix}"] = state.pop(f"{src}{suffix}")
                    renamed[f"{src}{suffix}"] = f"{dst}{suffix}"


def convert_state_dict(state: dict[str, torch.Tensor], fmt: str, model: nn.Module
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename a MAE / SimMIM / data2vec (or timm) state dict to `model`'s timm keys. Returns (state, renamed)."""
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"model.checkpoint_format: {fmt!r} is not one of {list(CHECKPOINT_FORMATS)} or 'auto'")
    renamed: dict[str, str] = {}
    state = dict(state)
    if fmt == "simmim":
        state = _strip_prefix(state, "encoder.")
    if fmt == "data2vec":
        if any(k.startswith("data2vec_vision.") or k.startswith("embeddings.") for k in state):
            raise ValueError("data2vec checkpoint in Hugging Face transformers layout (data2vec_vision.embeddings.*, "
                             "encoder.layer.N.*) is not supported; use the original data2vec_vision (BEiT) file")
        for prefix in ("module.", "backbone."):
            if all(k.startswith(prefix) for k in state):
                state = _strip_prefix(state, prefix)
    if fmt in ("simmim", "data2vec"):
        state = _beit_to_timm_vit(state, renamed)
    _pool_norm(state, set(model.state_dict()), renamed)
    return state, renamed


def _resample_embeddings(state: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Position embeddings to the model's patch grid (timm's resample_abs_pos_embed) and the patch-embedding
    kernel to its patch size (resample_patch_embed), in place; returns the keys resampled."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    done = []
    target = model.state_dict()
    w = state.get("patch_embed.proj.weight")
    if w is not None and "patch_embed.proj.weight" in target and w.shape[-2:] != target["patch_embed.proj.weight"].shape[-2:]:
        state["patch_embed.proj.weight"] = resample_patch_embed(w, list(target["patch_embed.proj.weight"].shape[-2:]))
        done.append("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        old_tokens = pos.shape[1] - prefix
        side = int(round(math.sqrt(old_tokens)))
        if side * side != old_tokens:
            raise ValueError(f"pos_embed: {old_tokens} patch positions is not a square grid; cannot resample")
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                    old_size=[side, side], num_prefix_tokens=prefix)
        done.append(f"pos_embed {side}x{side}->{'x'.join(map(str, model.patch_embed.grid_size))}")
    return done


def load_pretrained_backbone(model: nn.Module, state: dict[str, torch.Tensor], fmt: str,
                             source: str = "checkpoint") -> LoadReport:
    """Load a MAE / SimMIM / data2vec / timm state dict into a timm ViT, strictly.

    Only pre-training-only keys may be dropped (decoder*, mask_token, lm_head / head); only the model's
    classifier head may be missing. Any other missing or unexpected key, or a shape that does not fit after
    resampling, raises ValueError naming the keys, so that no backbone weight is silently left at its random
    initialisation. Returns what was done (also logged)."""
    state, renamed = convert_state_dict(state, fmt, model)
    rel_pos = sorted(k for k in state if "relative_position_bias_table" in k)
    target = model.state_dict()
    if rel_pos and not any("relative_position_bias_table" in k for k in target):
        raise ValueError(
            f"{source}: the checkpoint uses relative position bias ({_short(rel_pos, 3)}), which "
            f"{type(model).__name__} ({model.default_cfg.get('architecture', '?') if hasattr(model, 'default_cfg') else '?'}) "
            "does not have; loading it would silently drop those weights. Use a checkpoint with absolute position "
            "embeddings (SimMIM USE_APE=True, USE_RPB/USE_SHARED_RPB=False)")
    resampled = _resample_embeddings(state, model)
    head_keys = head_parameter_names(model) if getattr(model, "num_classes", 0) else set()
    dropped = sorted(k for k in state if k not in target and _DROPPABLE.match(k))
    unexpected = sorted(k for k in state if k not in target and k not in dropped)
    missing = sorted(k for k in target if k not in state)
    bad_missing = [k for k in missing if k not in head_keys]
    # A checkpoint head of another size (e.g. 1000 ImageNet classes) is dropped; the model's head starts fresh.
    mismatched = sorted(k for k in state if k in target and state[k].shape != target[k].shape)
    for key in [k for k in mismatched if k in head_keys]:
        dropped.append(key)
        missing.append(key)
        del state[key]
    mismatched = [k for k in mismatched if k not in head_keys]
    if bad_missing or unexpected or mismatched:
        problems = []
        if bad_missing:
            problems.append(f"backbone keys missing from the checkpoint: {_short(bad_missing)}")
        if unexpected:
            problems.append(f"checkpoint keys the model has no place for: {_short(unexpected)}")
        if mismatched:
            problems.append("shape mismatches: " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}" for k in mismatched[:8]))
        hint = ""
        if any(".ls1." in k or ".ls2." in k for k in unexpected + bad_missing):
            hint = " (layer scale: set model.overrides.init_values to match the checkpoint's gamma_1/gamma_2)"
        raise ValueError(f"{source} ({fmt} layout) does not match {type(model).__name__}: " + "; ".join(problems)
                         + hint + ". Refusing to load with backbone weights dropped.")
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    report = LoadReport(format=fmt, loaded=sorted(k for k in state if k in target), renamed=renamed,
                        dropped=sorted(set(dropped)), missing_head=sorted(set(missing) & head_keys),
                        resampled=resampled)
    log.info("%s: %s", source, report.summary())
    return report


# ------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ------------------------------------------------------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module, mode: str, offload_to_cpu: bool = False) -> nn.Module:
    """Recompute each transformer block in backward instead of storing its activations.

    "timm": the model's own set_grad_checkpointing(True) (torch.utils.checkpoint per block); "fairscale":
    fairscale's checkpoint_wrapper on every blocks[i] (offload_to_cpu keeps the saved block inputs on the
    CPU). Both keep the state-dict keys unchanged. Drop-path RNG is replayed in the recompute."""
    if mode == "none":
        if offload_to_cpu:
            raise ConfigError("model.checkpoint_offload: needs model.activation_checkpointing=fairscale")
        return model
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"model.activation_checkpointing: {type(model).__name__} has no .blocks to checkpoint")
    if mode == "timm":
        if offload_to_cpu:
            raise ConfigError("model.checkpoint_offload: only fairscale's checkpoint_wrapper offloads; set "
                              "model.activation_checkpointing=fairscale")
        model.set_grad_checkpointing(True)
    elif mode == "fairscale":
        from fairscale.nn.checkpoint import checkpoint_wrapper

        for i in range(len(blocks)):
            blocks[i] = checkpoint_wrapper(blocks[i], offload_to_cpu=offload_to_cpu)
    else:
        raise ConfigError(f"model.activation_checkpointing: {mode!r} is not one of ['none', 'timm', 'fairscale']")
    return model


# ------------------------------------------------------------------------------------------------------------
# Size and memory
# ------------------------------------------------------------------------------------------------------------
def meta_model(cfg: ModelConfig, contrastive: bool = True) -> nn.Module:
    """The model built on the meta device: shapes only, no memory, no weights read."""
    cfg = dataclasses.replace(cfg, pretrained_path=None)
    with torch.device("meta"):
        return build_contrastive_model(cfg) if contrastive else create_backbone(cfg)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


GIB = 1024 ** 3
# Optimizer-state bytes per parameter (fp32 master copy under bf16/fp16 included): ZeRO paper's K.
_OPTIMIZER_BYTES = {("sgd", "fp32"): 4, ("adamw", "fp32"): 8, ("sgd", "mixed"): 8, ("adamw", "mixed"): 12}


def estimate_memory(model_cfg: ModelConfig, micro_batch: int, views: int, precision: str, zero_stage: int,
                    world_size: int, *, optimizer: str = "sgd", fused_attention: bool = True) -> dict[str, Any]:
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
    plus the input images (a * b * 3 * H * W) and the contrastive loss: about 20 bytes per element of
    the local-views x global-views logit matrix (measured, losses.supcon_rows).
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
    loss = 20.0 * images * images * n
    total = weights + grads + opt_states + activations + inputs + loss
    out: dict[str, Any] = {
        "params": params, "tokens": tokens, "width": width, "depth": depth, "heads": heads,
        "images_per_forward": images, "precision": precision, "zero_stage": zero_stage, "world_size": n,
        "optimizer": optimizer, "activation_checkpointing": mode,
        "weights": weights, "grads": grads, "optimizer_states": opt_states, "activations": activations,
        "activations_per_block": one_block, "inputs": inputs, "loss": loss, "total": total,
    }
    for key in ("weights", "grads", "optimizer_states", "activations", "activations_per_block", "inputs", "loss",
                "total"):
        out[f"{key}_gib"] = out[key] / GIB
    return out


def format_memory_estimate(est: dict[str, Any]) -> str:
    """One line for the start-up summary."""
    return (f"memory estimate per GPU ({est['precision']}, ZeRO {est['zero_stage']}, world {est['world_size']}, "
            f"{est['params'] / 1e6:.1f}M params, {est['images_per_forward']} images/forward, checkpointing "
            f"{est['activation_checkpointing']}): weights {est['weights_gib']:.2f} + grads {est['grads_gib']:.2f} + "
            f"optimizer {est['optimizer_states_gib']:.2f} + activations {est['activations_gib']:.2f} + loss "
            f"{est['loss_gib']:.2f} = {est['total_gib']:.2f} GiB (lower bound)")
