"""timm ViT backbones (any name, size overrides, local weights), the stage-1 projection head, and the
classifier used by stage 2 and the CE baseline (a timm model with its own head, so that the exported
state dict loads with `timm.create_model(name, checkpoint_path=..., num_classes=...)`).

Also: local pretrained weights in the timm / MAE / SimMIM / data2vec (BEiT) layouts (through timm's own
checkpoint filters into vit_* or, with relative position bias, beit_* models; a dropped backbone weight is
an error), per-block activation checkpointing (timm or fairscale), and a start-up memory estimate
(`estimate_memory`)."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoint import flatten_settings, load_state_dict_file, settings_differences
from .config import ConfigError, ModelConfig
from .data.transforms import ImageStats

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


def head_parameter_names(classifier: nn.Module) -> set[str]:
    """State-dict keys of timm's classifier head (what a stage-1 backbone does not have)."""
    head = classifier.get_classifier()
    prefix = next(name for name, module in classifier.named_modules() if module is head)
    return {f"{prefix}.{key}" for key in head.state_dict()}


_ARCHITECTURE = ("name", "overrides", "global_pool")  # the model settings that decide a backbone's tensors


def _architecture_differences(backbone_path: str | Path, cfg: ModelConfig) -> list[str]:
    """Model settings in the manifest stage 1 wrote beside the backbone (`save_state_dict`) that differ from
    `cfg`, as 'model.key: backbone -> this run'; [] without a readable manifest."""
    try:
        manifest = json.loads(Path(backbone_path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return []
    model = (manifest.get("config") or {}).get("model") or {
        "name": manifest.get("model"), "overrides": manifest.get("model_overrides"),
        "global_pool": manifest.get("global_pool")}
    recorded = {key: model.get(key) or ({} if key == "overrides" else None) for key in _ARCHITECTURE}
    return settings_differences(flatten_settings({"model": recorded}),
                                flatten_settings({"model": {key: getattr(cfg, key) for key in _ARCHITECTURE}}))


def load_backbone_into(classifier: nn.Module, backbone_state: dict[str, torch.Tensor], source: str,
                       cfg: ModelConfig | None = None) -> None:
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
        differences = _architecture_differences(source, cfg) if cfg is not None else []
        settings = (f"its manifest {Path(source).with_suffix('.json')} says it was trained with other model "
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
        # safetensors, or a torch file read with weights_only=True: a user-supplied file runs no code.
        load_backbone_into(model, load_state_dict_file(backbone_path), backbone_path, cfg)
    if freeze_backbone:
        head_keys = head_parameter_names(model)
        for name, param in model.named_parameters():
            param.requires_grad_(name in head_keys)
    return model


# ------------------------------------------------------------------------------------------------------------
# Pretrained weights from a local file (model.pretrained_path), in other repositories' layouts
#
# What each layout looks like (read from the public code):
#   timm     a timm model's state dict (timm's releases, this project's exports and stage-1 backbones).
#   mae      facebookresearch/mae models_mae.py, MaskedAutoencoderViT saved as {"model": state_dict}: a timm
#            ViT encoder plus mask_token and decoder_embed / decoder_pos_embed / decoder_blocks / decoder_norm /
#            decoder_pred. Its fine-tuned models (models_vit.py, global_pool) replace norm by fc_norm, add head.
#   simmim   microsoft/SimMIM models/simmim.py, {"model": ...}: every encoder key under "encoder.", the decoder
#            under "decoder.", encoder.mask_token. The encoder is BEiT-style (below).
#   data2vec facebookresearch/data2vec_vision and microsoft/unilm BEiT / BEiT v2, {"model"|"module": ...}: the
#            BEiT code base's names without a prefix (mask_token, lm_head.* in pre-training).
# A BEiT-style encoder has attn.q_bias / attn.v_bias (no key bias), layer scale gamma_1 / gamma_2 and either
# absolute position embeddings (pos_embed) or relative position bias (rel_pos_bias.* shared by all blocks, or
# blocks.N.attn.relative_position_bias_table), as in the released SimMIM ViT-B, data2vec and BEiT weights.
# Absolute position embeddings load into timm's vit_* models, relative position bias into timm's beit_* models
# (timm's Beit uses the BEiT names as they are). Every layout takes one path: the encoder's keys (prefix
# stripped), then timm's own checkpoint_filter_fn for the model's architecture (vit: gamma_N -> lsN.gamma,
# patch and position embeddings resampled; beit: position embeddings and relative position tables resized,
# index buffers dropped). Ours only: q_bias + v_bias -> qkv.bias for vit_* (timm has no such conversion), a
# shared relative position table copied into every block of a beit_* model that has one per block (as BEiT's
# own fine-tuning does), and the final norm initialising fc_norm under global_pool=avg (`_pool_norm`). Then
# the strict rule: a checkpoint key the model does not take (other than decoder, mask token, LM or classifier
# head) or a model key left unfilled (other than the classifier head) is an error naming the keys and the file.
# ------------------------------------------------------------------------------------------------------------
CHECKPOINT_FORMATS = ("timm", "mae", "simmim", "data2vec")
# Keys of pre-training-only parts that may be dropped: decoders, mask tokens, LM / classifier heads,
# recomputed index buffers. Anything else left over is a backbone weight and must load.
_DROPPABLE = re.compile(r"^(decoder[._]|mask_token$|lm_head\.|head\.|head_dist\.|.*relative_position_index$)")
_REL_POS = "relative_position_bias_table"


def load_timm_weights(model: nn.Module, name: str, in_chans: int = 3) -> None:
    """timm's pretrained weights for `name` (architecture.tag) into `model`, through timm's own loader from the
    Hugging Face cache (fetched once per node, or an error naming the tag, the cache and the fetch command):
    timm's checkpoint filter resamples position embeddings to the model's img_size and a classifier of
    another class count is dropped. Strict: only the model's classifier head may stay unloaded (a
    checkpoint's final norm initialises fc_norm under global_pool=avg, as for local files)."""
    from timm.models import load_pretrained

    from .pretrained import ensure_cached

    path = ensure_cached(name)
    timm_filter = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    renamed: dict[str, str] = {}

    def filter_fn(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        state = timm_filter(state, model) if timm_filter is not None else state
        _pool_norm(state, set(model.state_dict()), renamed)
        return state

    result: dict[str, list[str]] = {}
    # timm loads non-strictly when the class count differs; the hook sees exactly what did not load.
    hook = model.register_load_state_dict_post_hook(
        lambda module, keys: result.update(missing=list(keys.missing_keys), unexpected=list(keys.unexpected_keys)))
    try:
        load_pretrained(model, num_classes=model.num_classes, in_chans=in_chans, filter_fn=filter_fn, strict=False)
    finally:
        hook.remove()
    head = head_parameter_names(model) if model.num_classes else set()
    missing = sorted(set(result.get("missing", [])) - head)
    unexpected = sorted(result.get("unexpected", []))
    if missing or unexpected:
        raise ValueError(f"model.name: timm's weights {name} ({path}) do not fit {type(model).__name__} with "
                         f"this run's model settings: backbone keys not loaded {_short(missing)}, checkpoint keys "
                         f"with no place {_short(unexpected)}. Refusing to train with backbone weights left random")
    log.info("model.name %s: timm's pretrained weights loaded from %s%s", name, path,
             f" (renamed {renamed})" if renamed else "")


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


def _short(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return str(keys[:n])[:-1] + (f", ... {len(keys) - n} more]" if len(keys) > n else "]")


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


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix` lose it; others (e.g. a SimMIM decoder) are kept as they are (then dropped)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _encoder_state(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The tensors of a `fmt` checkpoint under its encoder's own names (SimMIM's "encoder." prefix and a
    data2vec "module." / "backbone." wrapper stripped); a new dict."""
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"model.checkpoint_format: {fmt!r} is not one of {list(CHECKPOINT_FORMATS)} or 'auto'")
    if fmt == "simmim":
        return _strip_prefix(state, "encoder.")
    if fmt == "data2vec":
        if any(k.startswith("data2vec_vision.") or k.startswith("embeddings.") for k in state):
            raise ValueError("data2vec checkpoint in Hugging Face transformers layout (data2vec_vision.embeddings.*, "
                             "encoder.layer.N.*) is not supported; use the original data2vec_vision (BEiT) file")
        for prefix in ("module.", "backbone."):
            if all(k.startswith(prefix) for k in state):
                return _strip_prefix(state, prefix)
    return dict(state)


def _fuse_qv_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BEiT-style attn.q_bias + attn.v_bias (the key has no bias) -> timm VisionTransformer's attn.qkv.bias."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".attn.q_bias")]:
        block = key[:-len(".q_bias")]
        q, v = out.pop(key), out.pop(f"{block}.v_bias", None)
        if v is None:
            raise ValueError(f"{key} without {block}.v_bias: not a BEiT/SimMIM/data2vec attention layout")
        out[f"{block}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def _unshare_rel_pos_bias(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pre-training (BEiT, data2vec, SimMIM) shares one relative position table across blocks; timm's beit_*
    models have one per block: each block gets a copy, as BEiT's own fine-tuning code does."""
    shared = f"rel_pos_bias.{_REL_POS}"
    per_block = [k for k in target if k.endswith(f".attn.{_REL_POS}")]
    if shared not in state or shared in target or not per_block:
        return state
    out = dict(state)
    table = out.pop(shared)
    out.update({key: table.clone() for key in per_block})
    return out


def _architecture(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _position_error(state: dict[str, torch.Tensor], model: nn.Module) -> str | None:
    """Position weights the model has no place for (timm's filters would fail on them), and the model.name or
    model.overrides that would take them; None when they fit."""
    target = model.state_dict()
    arch = _architecture(model)
    rel = sorted(k for k in state if k.endswith(_REL_POS) and k not in target)
    if rel and isinstance(model, VisionTransformer):
        beit = "beit_" + arch[len("vit_"):] if arch.startswith("vit_") else ""
        use = beit if timm.is_model(beit) else f"one of {timm.list_models('beit*')}"
        return (f"the checkpoint has relative position bias ({_short(rel, 3)}), which timm's {arch} (absolute "
                f"position embeddings only) has no place for; set model.name: {use} (timm's BEiT: the same "
                "encoder with relative position bias; model.overrides still set its size)")
    if rel:
        return (f"relative position bias tables with no place in {arch}: {_short(rel, 3)}; set model.overrides "
                "depth, use_rel_pos_bias (one table per block) or use_shared_rel_pos_bias as in the checkpoint")
    if "pos_embed" in state and "pos_embed" not in target:
        return (f"the checkpoint has absolute position embeddings (pos_embed), which {arch} has not; use a vit_* "
                "model, or model.overrides.use_abs_pos_emb: true")
    return None


def _timm_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own checkpoint_filter_fn for the model's architecture (resampling, renames), if it has one."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    if isinstance(model, VisionTransformer):  # gamma_1 / gamma_2 -> ls1.gamma / ls2.gamma (as for DeiT III)
        return filter_fn(state, model, adapt_layer_scale=True)
    return filter_fn(state, model)


def load_pretrained_backbone(model: nn.Module, state: dict[str, torch.Tensor], fmt: str = "auto",
                             source: str = "checkpoint") -> list[str]:
    """Load a checkpoint in the timm / MAE / SimMIM / data2vec (BEiT) layout into a timm model, strictly,
    through timm's checkpoint filter for the model's architecture (see the table above).

    Only pre-training-only keys may be dropped (decoder*, mask_token, lm_head, a classifier head); only the
    model's classifier head may be left unfilled. Any other unexpected or missing key, or a shape that does not
    fit after timm's resampling, raises ValueError naming `source` and the keys, so that no backbone weight is
    silently left at its random initialisation. Returns the checkpoint keys dropped (also logged)."""
    fmt = detect_checkpoint_format(state) if fmt == "auto" else fmt
    target = model.state_dict()
    state = _unshare_rel_pos_bias(_encoder_state(state, fmt), target)
    problem = _position_error(state, model)
    if problem:
        raise ValueError(f"model.pretrained_path: {source} ({fmt} layout): {problem}")
    if isinstance(model, VisionTransformer):
        state = _fuse_qv_bias(state)
    dropped = {k for k in state if k not in target and _DROPPABLE.match(k)}  # before timm's filter removes some
    state = _timm_filter(state, model)
    _pool_norm(state, set(target), {})
    head = head_parameter_names(model) if getattr(model, "num_classes", 0) else set()
    for key in [k for k in head if k in state and state[k].shape != target[k].shape]:
        dropped.add(key)  # a classifier for other classes (e.g. ImageNet's): the model's head starts fresh
        del state[key]
    dropped |= {k for k in state if k not in target and _DROPPABLE.match(k)}
    unexpected = sorted(k for k in state if k not in target and k not in dropped)
    missing = sorted(set(target) - set(state) - head)
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in sorted(state) if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        problems = "; ".join(f"{label}: {_short(keys)}" for label, keys in (
            ("backbone keys missing from the checkpoint", missing),
            ("checkpoint keys the model has no place for", unexpected), ("shape mismatches", mismatched)) if keys)
        hint = ""
        if any(re.search(r"\.(ls[12]\.gamma|gamma_[12])$", k) for k in unexpected + missing):
            hint = (" (layer scale: set model.overrides.init_values to match the checkpoint's gamma_1/gamma_2, "
                    "or null when it has none)")
        raise ValueError(f"model.pretrained_path: {source} ({fmt} layout) does not match timm's "
                         f"{_architecture(model)}: {problems}{hint}. Refusing to load with backbone weights dropped.")
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    fresh = sorted(head - set(state))
    log.info("%s: %d tensors loaded (%s layout, through timm's %s filter)%s%s", source, len(target) - len(fresh),
             fmt, type(model).__module__, f"; dropped pre-training-only keys {_short(dropped)}" if dropped else "",
             f"; fresh head {fresh}" if fresh else "")
    return sorted(dropped)


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
    `enlarge_contrast` over k micro-batches (lacvit_dist.feature_cache) every recompute takes the loss of all
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
