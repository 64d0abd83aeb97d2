"""timm ViT backbones (any name, size overrides, pretrained weights), the stage-1 projection head, the
classifier used by stage 2 and the CE baseline (a timm model with its own head, so that the exported state dict
loads with `timm.create_model(name, checkpoint_path=..., num_classes=...)`), and per-block activation
checkpointing (timm or fairscale)."""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from lacvit_dist.config import ConfigError, ModelConfig
from lacvit_dist.data.transforms import ImageStats
from lacvit_dist.models.export import read_weights
from lacvit_dist.models.layouts import _short, head_parameter_names, load_pretrained_backbone, load_state_dict_file
from lacvit_dist.models.pretrained import load_timm_weights
from lacvit_dist.config import flatten_settings, settings_differences

log = logging.getLogger(__name__)


def create_backbone(cfg: ModelConfig, num_classes: int = 0, *, checkpointing: bool = True) -> nn.Module:
    """A timm model; num_classes=0 gives the pooled embedding (CLS after the final norm, or mean of patch
    tokens + fc_norm when global_pool='avg'), num_classes>0 adds timm's linear head on top of it.

    Weights from cfg.pretrained (timm's weights for the tag in cfg.name, from the Hugging Face cache:
    `load_timm_weights`) or cfg.pretrained_path: timm / MAE / SimMIM / data2vec (BEiT) files through
    `load_pretrained_backbone` (timm's checkpoint filter, then a strict check; relative position bias needs a
    beit_* model).
    Under `torch.device("meta")` no weights are read (shapes only).
    `checkpointing=False` ignores cfg.activation_checkpointing (a frozen backbone has no backward)."""
    if torch.get_default_device().type == "meta":
        cfg = dataclasses.replace(cfg, pretrained=False, pretrained_path=None)
    if cfg.pretrained_path is not None and not Path(cfg.pretrained_path).is_file():
        raise FileNotFoundError(f"model.pretrained_path: {cfg.pretrained_path} does not exist")
    if cfg.checkpoint_offload and cfg.activation_checkpointing != "fairscale":
        raise ConfigError("model.checkpoint_offload: needs model.activation_checkpointing=fairscale, got "
                          f"{cfg.activation_checkpointing!r}")
    try:
        model = timm.create_model(cfg.name, num_classes=num_classes, global_pool=cfg.global_pool,
                                  drop_path_rate=cfg.drop_path_rate, **cfg.overrides)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model.name: {err}") from None
        raise
    except TypeError as err:
        if not cfg.overrides:
            raise
        raise _overrides_error(cfg, err) from None
    if cfg.pretrained_path is not None:
        # Not timm's own file loading: it loads non-strictly whenever the head differs (always, for a backbone).
        load_pretrained_backbone(model, load_state_dict_file(cfg.pretrained_path), cfg.checkpoint_format,
                                 source=cfg.pretrained_path)
    if cfg.pretrained:
        load_timm_weights(model, cfg.name, in_chans=cfg.overrides.get("in_chans", 3))
    if checkpointing:
        apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.checkpoint_offload)
    return model


def _overrides_error(cfg: ModelConfig, err: TypeError) -> ConfigError:
    """timm hands model.overrides to the model class as keyword arguments: name the override it refused."""
    match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    if match and match.group(1) in cfg.overrides:
        key = match.group(1)
        return ConfigError(f"model.overrides.{key}: timm model {cfg.name!r} takes no argument {key!r} ({err})")
    return ConfigError(f"model.overrides: timm model {cfg.name!r} refused {cfg.overrides}: {err}")


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
        return z.view(batch, nviews, z.shape[-1])  # explicit width: an empty batch (ZeRO-3 lock-step) has no -1


def build_contrastive_model(cfg: ModelConfig) -> ContrastiveModel:
    backbone = create_backbone(cfg, num_classes=0)
    return ContrastiveModel(backbone, ProjectionHead(backbone.num_features, cfg.proj_hidden_dim, cfg.proj_dim))



_ARCHITECTURE = ("name", "overrides", "global_pool")  # the model settings that decide a backbone's tensors


def _architecture_differences(manifest: dict, cfg: ModelConfig) -> list[str]:
    """Model settings in a backbone's export manifest that differ from `cfg`, as 'model.key: backbone -> this
    run'; [] without a manifest (a plain weights file)."""
    model = (manifest.get("config") or {}).get("model")
    if not model:
        return []
    recorded = {key: model.get(key) or ({} if key == "overrides" else None) for key in _ARCHITECTURE}
    return settings_differences(flatten_settings({"model": recorded}),
                                flatten_settings({"model": {key: getattr(cfg, key) for key in _ARCHITECTURE}}))


def load_backbone_into(classifier: nn.Module, backbone_state: dict[str, torch.Tensor], source: str,
                       cfg: ModelConfig | None = None, manifest: dict | None = None) -> None:
    """Load a stage-1 backbone into a timm classifier; only the classifier head may be missing.

    A backbone of another architecture raises ConfigError naming `source`, the model settings that differ
    from `cfg` according to the backbone's manifest, and the tensors that do not fit (never a bare
    load_state_dict size-mismatch traceback)."""
    target = classifier.state_dict()
    missing = sorted(set(target) - set(backbone_state) - head_parameter_names(classifier))
    unexpected = sorted(set(backbone_state) - set(target))
    mismatched = [f"{key} {tuple(value.shape)} vs model {tuple(target[key].shape)}"
                  for key, value in sorted(backbone_state.items())
                  if key in target and value.shape != target[key].shape]
    if missing or unexpected or mismatched:
        problems = "; ".join(f"{label} {_short(keys, 4)}" for label, keys in (
            ("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)) if keys)
        differences = _architecture_differences(manifest or {}, cfg) if cfg is not None else []
        settings = (f"its manifest ({source}/config.json) says it was trained with other model "
                    f"settings ({'; '.join(differences)}; backbone -> this run), " if differences else "")
        raise ConfigError(f"stage2.backbone_path: {source} does not fit this run's model: {settings}tensors: "
                          f"{problems}. Set the model section as the backbone was trained, or use a backbone "
                          f"trained with this model")
    classifier.load_state_dict(backbone_state, strict=False)


def build_classifier(cfg: ModelConfig, num_classes: int, backbone_path: str | None = None,
                     freeze_backbone: bool = False) -> nn.Module:
    """timm model with a linear head; optionally initialised from a stage-1 backbone and frozen but for the head."""
    if backbone_path is not None:  # its weights replace the pretrained ones: do not read (or fetch) those
        cfg = dataclasses.replace(cfg, pretrained=False, pretrained_path=None)
    model = create_backbone(cfg, num_classes=num_classes, checkpointing=not freeze_backbone)
    if backbone_path is not None:
        # An export folder, or a weights file (safetensors, or torch with weights_only=True: it runs no code).
        state, manifest = read_weights(backbone_path)
        load_backbone_into(model, state, backbone_path, cfg, manifest)
    if freeze_backbone:
        head_keys = head_parameter_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in head_keys)
    return model


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

