"""lacvit_dist: distributed label-aware contrastive fine-tuning (LaCViT) of timm Vision Transformers."""

__version__ = "0.1.0"
