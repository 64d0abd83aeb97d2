"""Run configuration: typed dataclasses, merged as defaults <- YAML file <- command-line dotted overrides.

Every error names the offending field by its dotted path (and the file it came from), so that a typo in a
500-GPU job fails at start-up on the login node rather than an hour into the queue.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lacvit_dist.io import write_text
from lacvit_dist.stages import STAGE_NAMES


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or inconsistent; the message names the field."""


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading YAML 1.2 floats: YAML 1.1 makes `1e-3` (no dot) a string, so `lr: 1e-3`
    in a file or `stage1.optimizer.lr=1e-3` on the command line would fail as 'expected float, got str'."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class RunConfig:
    name: str = "lacvit"
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stages: list[str] = field(default_factory=lambda: ["stage1", "stage2"])
    # Checkpoints (every rank, atomic "latest"): at every epoch end, every N steps if > 0, on SIGTERM/SIGUSR1.
    # A restart with the same run.name resumes the unfinished stage from the latest and skips finished ones
    # whose recorded settings match; a finished stage with other settings stops the run (naming them) unless
    # reuse_finished_stages is true (then it is kept as it is, with a warning).
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    reuse_finished_stages: bool = False
    max_nonfinite_steps: int = 5  # non-finite loss: skip the step on all ranks; stop after this many in a row
    # How often ranks agree on a pending SIGTERM/SIGUSR1 (one all-reduce): every N steps, and sooner when
    # steps are slow, so that about every S seconds; also before and after every evaluation.
    stop_check_every_steps: int = 10
    stop_check_every_s: float = 30.0
    # A collective that waits longer than this raises on every waiting rank (a peer hung, or its node's link is
    # down; a peer process that died is seen at once). It must exceed the longest wait of a healthy job: rank 0
    # fetching pretrained weights while the others wait, a checkpoint save, an evaluation pass.
    collective_timeout_s: float = 1800.0


@dataclass
class ModelConfig:
    name: str = "vit_large_patch16_224"  # any timm ViT name
    # Size overrides passed to timm.create_model (img_size, patch_size, embed_dim, depth, num_heads, ...).
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained_path: str | None = None  # local checkpoint file (layout: checkpoint_format); nothing is downloaded
    # timm's own weights for `name` (`<architecture>.<tag>`, e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k or
    # vit_base_patch16_224.mae; no tag: timm's default) from the Hugging Face cache ($HF_HOME/hub); with
    # HF_HUB_OFFLINE=1 nothing is downloaded (fetch first: lacvit-fetch-weights --config <file>).
    pretrained: bool = False
    global_pool: Literal["token", "avg"] = "token"  # CLS token, or mean of patch tokens (MAE/SimMIM style)
    drop_path_rate: float = 0.0
    proj_hidden_dim: int | None = None  # None: the backbone's embedding width, as in the paper
    proj_dim: int = 128
    # Layout of pretrained_path: "timm", "mae" (facebookresearch/mae), "simmim" (microsoft/SimMIM), "data2vec"
    # (data2vec_vision, BEiT, BEiT v2: the BEiT code base's layout), or "auto" (detected from the keys). All go
    # through timm's checkpoint filter for `name`: relative position bias (released SimMIM ViT-B, data2vec,
    # BEiT) needs a beit_* model, absolute position embeddings a vit_* one. A backbone weight that would be
    # dropped, or a checkpoint weight with no place, is an error.
    checkpoint_format: Literal["auto", "timm", "mae", "simmim", "data2vec"] = "auto"
    # Activation checkpointing per transformer block: timm's own (set_grad_checkpointing) or fairscale's
    # checkpoint_wrapper (checkpoint_offload=True: keep the saved block inputs on the CPU).
    activation_checkpointing: Literal["none", "timm", "fairscale"] = "none"
    checkpoint_offload: bool = False


@dataclass
class DataConfig:
    root: str = "data/digits"  # folder with _info.json and the tar shards
    train_split: str = "train"
    # null: no val split (shards written with --val 0): no kNN/val monitor during or after stage 1, no val
    # metrics for the classifiers; results.json records val_split: null.
    val_split: str | None = "val"
    test_split: str = "test"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # Training augmentation (LACVIT.md): RandomResizedCrop scale range (all training views) and stage-1
    # colour jitter strength.
    crop_scale_min: float = 0.2
    color_jitter: float = 0.4
    hflip: bool = True  # off for data where mirroring changes the class (digits, text)
    # Every read of the train split (training stream, stage-1 kNN bank): skip undecodable images, missing/bad
    # labels and samples lost to unreadable or cut-short tars, count them per kind (results.json, TensorBoard);
    # "error" stops at the first one, naming split, shard and key. Val and test reads are always strict.
    on_bad_sample: Literal["skip", "error"] = "skip"
    # "resampled": every rank x worker draws shards with replacement forever; an epoch is steps_per_epoch
    # steps. "finite": each epoch reshuffles the shards (seed + epoch) and deals them to ranks, then workers, so
    # it sees every sample at most once (exactly once with even shards); steps per epoch follow from the shard
    # lengths (needs at least ranks x workers train shards; steps_per_epoch must stay null).
    epoch_mode: Literal["resampled", "finite"] = "resampled"
    # Stage 1: every class in a micro batch (hence in the global batch) appears at least m + 1 times, so every
    # anchor has at least m same-class partners besides its own second view; 0 = off. stage1.micro_batch_size
    # must be a multiple of m + 1.
    class_aware_m: int = 0
    # Shard names in _info.json starting with "pipe:" are shell commands to webdataset: refused unless true.
    allow_pipe_urls: bool = False


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    layer_decay: float | None = None  # layer-wise lr decay for ViTs (timm's param groups), e.g. 0.75
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class StageConfig:
    epochs: int = 1
    micro_batch_size: int = 32  # per rank, per forward pass
    grad_accum_steps: int = 1
    global_batch_size: int | None = None  # optional check: must equal micro x accum x world size
    # Optimizer steps per epoch; None: one pass over the training split (samples // global batch).
    steps_per_epoch: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval_every_epochs: int = 1
    log_every_steps: int = 10


@dataclass
class Stage1Config(StageConfig):
    temperature: float = 0.1
    # With grad_accum_steps > 1: "enlarge_contrast" contrasts every anchor with all micro-batches of the
    # optimizer step on all ranks (feature cache: one no-grad forward, then a forward+backward per
    # micro-batch); "plain" accumulates gradients of per-micro-batch losses (contrast set = one micro-batch
    # on all ranks), cheaper by one forward.
    accumulation: Literal["enlarge_contrast", "plain"] = "enlarge_contrast"
    base_temperature: float | None = None  # the authors' code scales the loss by temperature / 0.07


@dataclass
class Stage2Config(StageConfig):
    backbone_path: str | None = None  # stage-1 export folder (or a weights file); None: this run's stage 1


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_clipping: float = 1.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    # A DeepSpeed JSON config merged over the one generated from this file (e.g. ZeRO bucket sizes,
    # offload, activation checkpointing of DeepSpeed's own); batch sizes must agree with the stage's.
    config_file: str | None = None
    # torch.compile of the model through DeepSpeed's engine.compile. Backend "inductor" (generated kernels)
    # for GPUs; "aot_eager" captures forward and backward graphs without generating code (a cheap check).
    compile: bool = False
    compile_backend: str = "inductor"
    # Under bf16, gradients are reduced across ranks in grad_reduce_dtype and summed over micro-batches in
    # grad_accum_dtype. DeepSpeed's default for both is bf16, whose running sums lose ~5e-3 relative over 16
    # terms; "fp32" (ours) keeps them exact to fp32, "model" restores DeepSpeed's bf16.
    grad_reduce_dtype: Literal["fp32", "model"] = "fp32"
    grad_accum_dtype: Literal["fp32", "model"] = "fp32"


@dataclass
class LoggingConfig:
    tensorboard: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=lambda: Stage1Config(epochs=10))
    stage2: Stage2Config = field(default_factory=lambda: Stage2Config(
        epochs=10, optimizer=OptimizerConfig(lr=0.1, weight_decay=0.0)))
    baseline: StageConfig = field(default_factory=lambda: StageConfig(epochs=10))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def stage(self, name: str) -> StageConfig:
        if name not in STAGE_NAMES:
            raise ConfigError(f"run.stages: unknown stage {name!r}; choose from {list(STAGE_NAMES)}")
        return getattr(self, name)



# --------------------------------------------------------------------------------------------- typed build
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} is not {' or '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got boolean {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            raise ConfigError(f"{where + '.' if where else ''}{key}: unknown key; valid keys here: {names}")
    base = cls()
    kwargs = {}
    for name in names:
        path = f"{where}.{name}" if where else name
        if name in data:
            current = getattr(base, name)
            value = data[name]
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                # Merge into this field's own default (stage2 keeps its lr=0.1 unless told otherwise).
                value = deep_merge(dataclasses.asdict(current), value)
            kwargs[name] = _coerce(value, hints[name], path)
        else:
            kwargs[name] = getattr(base, name)
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_dotlist(items: list[str]) -> dict[str, Any]:
    """['stage1.epochs=3', 'model.overrides.depth=2'] -> nested dict; values parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: malformed key {key!r}")
        try:
            value = _load_yaml_text(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is both a value and a section")
        node[leaf] = value
    return tree


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = _load_yaml_text(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """defaults <- YAML file <- dotted overrides, then validated."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = load_yaml(path)
        source = str(path)
    data = deep_merge(data, parse_dotlist(overrides or []))
    try:
        cfg = _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{err} (from {source} and command-line overrides)") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need more than one field's type."""
    for name in cfg.run.stages:
        cfg.stage(name)
    for key in ("checkpoint_every_steps", "keep_checkpoints"):
        if getattr(cfg.run, key) < 0:
            raise ConfigError(f"run.{key}: must be >= 0, got {getattr(cfg.run, key)}")
    if cfg.run.stop_check_every_steps < 1:
        raise ConfigError(f"run.stop_check_every_steps: must be >= 1, got {cfg.run.stop_check_every_steps}")
    if cfg.run.collective_timeout_s <= 0:
        raise ConfigError(f"run.collective_timeout_s: must be > 0, got {cfg.run.collective_timeout_s}")
    if cfg.run.stop_check_every_s <= 0:
        raise ConfigError(f"run.stop_check_every_s: must be > 0, got {cfg.run.stop_check_every_s}")
    if cfg.run.max_nonfinite_steps < 1:
        raise ConfigError(f"run.max_nonfinite_steps: must be >= 1, got {cfg.run.max_nonfinite_steps}")
    for name in STAGE_NAMES:
        stage = cfg.stage(name)
        for key in ("epochs", "micro_batch_size", "grad_accum_steps", "eval_every_epochs", "log_every_steps"):
            if getattr(stage, key) < 1:
                raise ConfigError(f"{name}.{key}: must be >= 1, got {getattr(stage, key)}")
        if stage.steps_per_epoch is not None and stage.steps_per_epoch < 1:
            raise ConfigError(f"{name}.steps_per_epoch: must be >= 1 or null, got {stage.steps_per_epoch}")
        if stage.optimizer.lr <= 0:
            raise ConfigError(f"{name}.optimizer.lr: must be > 0, got {stage.optimizer.lr}")
        if not 0.0 <= stage.optimizer.min_lr_ratio <= 1.0:
            raise ConfigError(f"{name}.optimizer.min_lr_ratio: must be in [0, 1]")
        if stage.optimizer.layer_decay is not None and not 0.0 < stage.optimizer.layer_decay <= 1.0:
            raise ConfigError(f"{name}.optimizer.layer_decay: must be in (0, 1], got {stage.optimizer.layer_decay}")
        if len(stage.optimizer.betas) != 2:
            raise ConfigError(f"{name}.optimizer.betas: expected two values, got {stage.optimizer.betas}")
    if cfg.model.pretrained and cfg.model.pretrained_path is not None:
        raise ConfigError("model.pretrained: true and model.pretrained_path both name the starting weights; "
                          "set one (pretrained: timm's weights for model.name; pretrained_path: a local file)")
    if cfg.stage1.temperature <= 0:
        raise ConfigError(f"stage1.temperature: must be > 0, got {cfg.stage1.temperature}")
    if not 0.0 < cfg.data.crop_scale_min <= 1.0:
        raise ConfigError(f"data.crop_scale_min: must be in (0, 1], got {cfg.data.crop_scale_min}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.epoch_mode == "finite":
        for name in cfg.run.stages:
            if cfg.stage(name).steps_per_epoch is not None:
                raise ConfigError(f"{name}.steps_per_epoch: must be null with data.epoch_mode=finite (the shards "
                                  f"define the epoch), got {cfg.stage(name).steps_per_epoch}")
    if cfg.data.class_aware_m < 0:
        raise ConfigError(f"data.class_aware_m: must be >= 0, got {cfg.data.class_aware_m}")
    if cfg.stage1.micro_batch_size % (cfg.data.class_aware_m + 1):
        raise ConfigError(f"data.class_aware_m: stage1.micro_batch_size {cfg.stage1.micro_batch_size} must be a "
                          f"multiple of class_aware_m + 1 = {cfg.data.class_aware_m + 1} (batches are built from "
                          f"same-class groups of that size)")
    if cfg.deepspeed.precision == "fp16" and cfg.run.device == "cpu":
        raise ConfigError("deepspeed.precision: fp16 is not supported by DeepSpeed on CPU; use fp32 or bf16")
    if cfg.deepspeed.precision == "fp16" and cfg.deepspeed.zero_stage == 0:
        # DeepSpeed 0.19.8's engine.backward applies the loss scale for its ZeRO optimizers only; its ZeRO-0 fp16
        # optimizer still divides the gradients by the scale in step(): every update would be 1/scale too small.
        raise ConfigError("deepspeed.precision: fp16 needs deepspeed.zero_stage >= 1 (DeepSpeed's ZeRO-0 fp16 path "
                          "leaves the loss unscaled but unscales the gradients: updates 1/65536 of the true ones); "
                          "set deepspeed.zero_stage=1 or 2, or use bf16")
    _check_ranges(cfg)
    _check_splits(cfg)
    _check_bf16_accumulation(cfg)


# (rule, test) pairs for _check_ranges; NaN fails both. Values these accept would otherwise pass silently
# (warmup_steps < 0 starts the LR above 0, drop_path_rate < 0 means 0) or fail later in torch without the field.
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_UNIT_INTERVAL = ("in [0, 1)", lambda v: 0 <= v < 1)


def _check_ranges(cfg: Config) -> None:
    """Single-field range checks, one table (betas' length is checked before)."""
    checks = [("model.drop_path_rate", cfg.model.drop_path_rate, _UNIT_INTERVAL),
              ("deepspeed.gradient_clipping", cfg.deepspeed.gradient_clipping, _NON_NEGATIVE),  # 0: off
              ("data.shuffle_buffer", cfg.data.shuffle_buffer, _NON_NEGATIVE),
              ("data.color_jitter", cfg.data.color_jitter, _NON_NEGATIVE)]
    for name in STAGE_NAMES:  # every stage's optimizer, run or not: a config is valid as a whole
        opt = cfg.stage(name).optimizer
        checks += [(f"{name}.optimizer.{key}", getattr(opt, key), _NON_NEGATIVE)
                   for key in ("warmup_steps", "momentum", "weight_decay")]
        checks += [(f"{name}.optimizer.betas[{i}]", beta, _UNIT_INTERVAL) for i, beta in enumerate(opt.betas)]
    for where, value, (rule, ok) in checks:
        if not ok(value):
            raise ConfigError(f"{where}: must be {rule}, got {value}")


def _check_splits(cfg: Config) -> None:
    """Train, val (if any) and test name different splits: the same name twice trains on test data, monitors
    stage 1 (kNN, val metrics) on it, or validates on training data."""
    splits = [("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split),
              ("data.test_split", cfg.data.test_split)]
    for (field_a, a), (field_b, b) in itertools.combinations(splits, 2):
        if a is not None and a == b:
            raise ConfigError(f"{field_a} and {field_b}: both are {a!r}; the three splits must differ (test data "
                              f"must never be used for training or model monitoring, nor val data for training)")


def _check_bf16_accumulation(cfg: Config) -> None:
    """DeepSpeed 0.19.8 sums ZeRO-0 bf16 gradients in bf16 only (fp32 sums need its ZeRO optimizers)."""
    ds = cfg.deepspeed
    if ds.precision != "bf16" or ds.zero_stage != 0 or ds.grad_accum_dtype != "fp32":
        return
    for name in cfg.run.stages:
        if cfg.stage(name).grad_accum_steps > 1:
            raise ConfigError(
                f"deepspeed.grad_accum_dtype: fp32 sums of bf16 gradients need deepspeed.zero_stage >= 1 "
                f"(DeepSpeed's ZeRO-0 bf16 path accumulates in bf16), and {name}.grad_accum_steps is "
                f"{cfg.stage(name).grad_accum_steps}. Set deepspeed.zero_stage=1 (same results, optimizer states "
                f"partitioned), or deepspeed.grad_accum_dtype=model to accept bf16 sums")


def check_batch_arithmetic(stage_name: str, stage: StageConfig, world_size: int, train_samples: int) -> int:
    """Global batch = micro x accumulation x world; returns the number of optimizer steps per epoch
    (stage.steps_per_epoch, or one pass over the training split)."""
    global_batch = stage.micro_batch_size * stage.grad_accum_steps * world_size
    if stage.global_batch_size is not None and stage.global_batch_size != global_batch:
        raise ConfigError(
            f"{stage_name}.global_batch_size: {stage.global_batch_size} != micro_batch_size "
            f"{stage.micro_batch_size} x grad_accum_steps {stage.grad_accum_steps} x world size {world_size}"
            f" = {global_batch}")
    steps = train_samples // global_batch
    if steps < 1:
        raise ConfigError(
            f"{stage_name}.micro_batch_size: global batch {global_batch} (micro {stage.micro_batch_size} x "
            f"accum {stage.grad_accum_steps} x world {world_size}) exceeds the {train_samples} training samples")
    return stage.steps_per_epoch or steps


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the merged config (what actually ran) as YAML, atomically."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'overrides': {'depth': 2}}} -> {'model.overrides.depth': 2}; values JSON-normalised (lists,
    not tuples), so that a config and one read back from JSON compare equal."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty mapping (no model.overrides) adds no key
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return flat


_UNSET = "(not set)"


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: recorded -> current' for every dotted key whose value differs (or is set on one side only)."""
    return [f"{key}: {json.dumps(recorded.get(key, _UNSET))} -> {json.dumps(current.get(key, _UNSET))}"
            for key in sorted(set(recorded) | set(current)) if recorded.get(key, _UNSET) != current.get(key, _UNSET)]
