"""Pretrained weights from a local file (model.pretrained_path) in other repositories' layouts, into timm's
ViT (vit_*) or BEiT (beit_*) models through timm's own checkpoint filters, strictly: a dropped backbone weight
is an error naming the keys and the file."""
from __future__ import annotations

import logging
import pickle
import re
import sys
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

log = logging.getLogger(__name__)


def head_parameter_names(classifier: nn.Module) -> set[str]:
    """State-dict keys of timm's classifier head (what a stage-1 backbone does not have)."""
    head = classifier.get_classifier()
    prefix = next(name for name, module in classifier.named_modules() if module is head)
    return {f"{prefix}.{key}" for key in head.state_dict()}



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


_WRAPPER_KEYS = ("state_dict", "model", "module")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or .pt/.pth/.bin, safely (torch.load with weights_only=True).

    A top-level "state_dict", "model" or "module" entry (common trainer layouts) is unwrapped. Errors name
    the file: missing file, unknown suffix, a pickle that weights_only refuses (arbitrary objects), or
    content that is not a mapping of names to tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise ValueError(f"{path}: unsupported weights format {suffix!r} (use .safetensors, .pt, .pth or .bin)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} holds objects other than tensors and plain containers, which are not loaded "
                         "(torch.load weights_only=True refused it, as it could run code). Re-save the weights "
                         "with torch.save(model.state_dict(), ...) or as .safetensors. Detail: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path} could not be read by torch.load: {type(exc).__name__}: {exc}") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return obj
