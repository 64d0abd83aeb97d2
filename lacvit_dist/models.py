"""timm ViT backbones (any name, size overrides, local weights), the stage-1 projection head, and the
classifier used by stage 2 and the CE baseline (a timm model with its own head, so that the exported
state dict loads with `timm.create_model(name, checkpoint_path=..., num_classes=...)`)."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_state_dict_file
from .config import ModelConfig
from .data.transforms import ImageStats


def create_backbone(cfg: ModelConfig, num_classes: int = 0) -> nn.Module:
    """A timm model; num_classes=0 gives the pooled embedding (CLS after the final norm, or mean of patch
    tokens + fc_norm when global_pool='avg'), num_classes>0 adds timm's linear head on top of it."""
    if cfg.pretrained_path is not None and not Path(cfg.pretrained_path).is_file():
        raise FileNotFoundError(f"model.pretrained_path: {cfg.pretrained_path} does not exist")
    try:
        return timm.create_model(
            cfg.name, num_classes=num_classes, global_pool=cfg.global_pool, drop_path_rate=cfg.drop_path_rate,
            # timm's own local-file mechanism: it resamples position embeddings and drops the head.
            pretrained=cfg.pretrained_path is not None,
            pretrained_cfg_overlay=dict(file=cfg.pretrained_path) if cfg.pretrained_path else None,
            **cfg.overrides)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model.name: {err}") from None
        raise


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
    model = create_backbone(cfg, num_classes=num_classes)
    if backbone_path is not None:
        # safetensors, or a torch file read with weights_only=True: a user-supplied file runs no code.
        load_backbone_into(model, load_state_dict_file(backbone_path), backbone_path)
    if freeze_backbone:
        head_keys = head_parameter_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in head_keys)
    return model
