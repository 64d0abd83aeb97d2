"""One class per objective. Each builds its model and training transform and turns a batch into
(loss, metrics); the engine around them is shared."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lacvit_dist.config import Config
from lacvit_dist.data import transforms
from lacvit_dist.train.feature_cache import feature_cache_step
from lacvit_dist.train.losses import SupConLoss
from lacvit_dist.stages import STAGES
from lacvit_dist.models.factory import build_classifier, build_contrastive_model, image_stats
from lacvit_dist.train.nonfinite import guarded_backward_step, NonFiniteGuard

VIEWS = 2  # stage 1: two augmented views per image (LACVIT.md)


def engine_dtype(engine) -> torch.dtype:
    """The dtype the DeepSpeed engine's module computes in (its inputs must match)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def to_engine(engine, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) on the engine's device, images in its compute dtype."""
    images, labels = batch
    return (images.to(engine.device, engine_dtype(engine), non_blocking=True),
            labels.to(engine.device, non_blocking=True))


class Objective:
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
        """(loss to backpropagate, detached metrics including the loss value to log) for one micro-batch."""
        raise NotImplementedError

    def train_step(self, engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                   guard: NonFiniteGuard) -> dict[str, torch.Tensor]:
        """Forward/backward every micro-batch (host or device tensors) of one optimizer step through the
        DeepSpeed engine (which
        scales each by 1/accumulation and steps the optimizer at the boundary); a non-finite loss on any rank
        skips the step on every rank (`guard`). Returns mean metrics."""
        totals: dict[str, torch.Tensor] = {}
        for batch in micro_batches:  # each micro-batch reaches the device only when it is used
            loss, metrics = self.loss(engine, *to_engine(engine, batch))
            guarded_backward_step(engine, loss, guard)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value.detach().float()
        return {key: value / len(micro_batches) for key, value in totals.items()}

    def contrast_terms(self, micro_batch: int, accum: int, world: int) -> int | None:
        """Terms in each anchor's contrastive denominator (None for cross-entropy tasks)."""
        return None

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()


class SupConObjective(Objective):
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
        view = transforms.contrastive_view(self.stats, d.crop_scale_min, d.color_jitter, d.hflip)
        return transforms.MultiView(view, VIEWS)

    def loss(self, model, images, labels):
        return self.criterion(model(images), labels)

    def encode(self, model: nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """Backbone embedding and L2-normalised projection, for the kNN / embedding-health monitor."""
        def both(images: torch.Tensor) -> dict[str, torch.Tensor]:
            features = model.backbone(images)
            return {"backbone": features, "projection": model.head(features)}
        return both

    def contrast_terms(self, micro_batch: int, accum: int, world: int) -> int:
        enlarged = accum if self.cfg.stage1.accumulation == "enlarge_contrast" else 1
        return VIEWS * micro_batch * world * enlarged - 1

    def train_step(self, engine, micro_batches, guard):
        if len(micro_batches) == 1 or self.cfg.stage1.accumulation == "plain":
            return super().train_step(engine, micro_batches, guard)
        # Every anchor contrasted with all k micro-batches x all ranks (lacvit_dist.train.feature_cache). The k
        # backward passes together give exactly the gradient of the one-big-batch loss, so DeepSpeed must not
        # divide them by k (scale_wrt_gas=False).
        return feature_cache_step(engine, micro_batches, lambda batch: to_engine(engine, batch), self.criterion,
                                  lambda loss: guarded_backward_step(engine, loss, guard, scale_wrt_gas=False))


class _ClassifierObjective(Objective):
    classifies = True

    @property
    def backbone(self) -> nn.Module:
        return self.model

    def train_transform(self) -> Callable:
        return transforms.classifier_train(self.stats, self.cfg.data.crop_scale_min, self.cfg.data.hflip)

    def loss(self, model, images, labels):
        logits = model(images).float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"loss": loss.detach(), "accuracy": (logits.argmax(-1) == labels).float().mean().detach()}


class LinearProbeObjective(_ClassifierObjective):
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


class CEFineTuneObjective(_ClassifierObjective):
    """The baseline to beat: the same pretrained backbone fine-tuned end to end with cross-entropy."""
    name = "baseline"

    def build_model(self) -> nn.Module:
        return build_classifier(self.cfg.model, self.num_classes)


OBJECTIVES: dict[str, type[Objective]] = {"stage1": SupConObjective, "stage2": LinearProbeObjective,
                                           "baseline": CEFineTuneObjective}  # by lacvit_dist.stages name


def build_objective(stage: str, cfg: Config, num_classes: int, backbone_path: str | None = None) -> Objective:
    """The objective of `stage`; a stage that trains on another's backbone (`Stage.trains_on`) gets its file."""
    if STAGES[stage].trains_on:
        return OBJECTIVES[stage](cfg, num_classes, backbone_path)
    return OBJECTIVES[stage](cfg, num_classes)

