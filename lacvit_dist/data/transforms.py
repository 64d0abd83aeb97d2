"""Image transforms of each stage: the paper's two-view stage-1 augmentation, stage-2 train and eval views.

All use the backbone's own input size and normalisation (ImageStats, resolved from the timm model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T


@dataclass(frozen=True)
class ImageStats:
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _flip(hflip: bool) -> list:
    return [T.RandomHorizontalFlip()] if hflip else []


def contrastive_view(stats: ImageStats, crop_scale_min: float = 0.2, jitter: float = 0.4,
                     hflip: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """One stage-1 view (LACVIT.md): RandomResizedCrop(scale 0.2-1), flip, ColorJitter p=0.8, grayscale p=0.2."""
    return T.Compose([
        T.RandomResizedCrop(stats.img_size, scale=(crop_scale_min, 1.0)),
        *_flip(hflip),
        T.RandomApply([T.ColorJitter(jitter, jitter, jitter, min(0.1, jitter / 4))], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(stats.mean, stats.std),
    ])


class MultiView:
    """Applies an augmentation `views` times independently; returns [views, C, H, W]."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], views: int = 2):
        self.transform = transform
        self.views = views

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.views)])


def classifier_train(stats: ImageStats, crop_scale_min: float = 0.08,
                     hflip: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """Stage 2 / baseline training view: RandomResizedCrop + flip (the authors' stage-2 recipe)."""
    return T.Compose([T.RandomResizedCrop(stats.img_size, scale=(crop_scale_min, 1.0)), *_flip(hflip), T.ToTensor(),
                      T.Normalize(stats.mean, stats.std)])


def evaluation(stats: ImageStats) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic view for evaluation: plain resize to the backbone's input size."""
    return T.Compose([T.Resize((stats.img_size, stats.img_size)), T.ToTensor(),
                      T.Normalize(stats.mean, stats.std)])
