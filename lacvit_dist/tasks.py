"""One class per objective. Each builds its model and training transform and turns a batch into
(loss, metrics); the engine around them is shared."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .data import transforms
from .losses import SupConLoss
from .models import build_classifier, build_contrastive_model, image_stats


class Task:
    name: str
    classifies: bool  # evaluated with Top-1/Top-5 on the val/test splits

    def __init__(self, cfg: Config, num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.model = self.build_model()
        self.stats = image_stats(self.backbone)

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_transform(self) -> Callable:
        raise NotImplementedError

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()


class Stage1Contrastive(Task):
    """Backbone + projection head trained with the cross-rank label-aware contrastive loss (2 views)."""
    name, classifies = "stage1", False

    def __init__(self, cfg: Config, num_classes: int):
        super().__init__(cfg, num_classes)
        self.criterion = SupConLoss(cfg.stage1.temperature, cfg.stage1.base_temperature)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def build_model(self) -> nn.Module:
        return build_contrastive_model(self.cfg.model)

    def train_transform(self) -> Callable:
        d = self.cfg.data
        return transforms.MultiView(transforms.contrastive_view(self.stats, d.crop_scale_min, d.color_jitter, d.hflip))

    def loss(self, model, images, labels):
        loss, stats = self.criterion(model(images), labels)
        return loss, stats


class _Classification(Task):
    classifies = True

    @property
    def backbone(self) -> nn.Module:
        return self.model

    def train_transform(self) -> Callable:
        return transforms.classifier_train(self.stats, self.cfg.data.crop_scale_min, self.cfg.data.hflip)

    def loss(self, model, images, labels):
        logits = model(images).float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(-1) == labels).float().mean().detach()}


class Stage2Linear(_Classification):
    """Frozen stage-1 backbone, linear head trained with cross-entropy."""
    name = "stage2"

    def __init__(self, cfg: Config, num_classes: int, backbone_path: str):
        self.backbone_path = backbone_path
        super().__init__(cfg, num_classes)

    def build_model(self) -> nn.Module:
        return build_classifier(self.cfg.model, self.num_classes, self.backbone_path, freeze_backbone=True)

    def set_train_mode(self, model: nn.Module) -> None:
        # The frozen encoder keeps inference behaviour (no drop-path / dropout) while the head trains.
        model.eval()


class BaselineFinetune(_Classification):
    """The baseline to beat: the same pretrained backbone fine-tuned end to end with cross-entropy."""
    name = "baseline"

    def build_model(self) -> nn.Module:
        return build_classifier(self.cfg.model, self.num_classes)
