"""Pretrained timm weights by name and tag (`model.pretrained: true`), from the Hugging Face hub cache.

timm names its weights `<architecture>.<tag>` (e.g. `vit_large_patch16_224.augreg_in21k_ft_in1k`, or
`vit_base_patch16_224.mae`); a name without a tag means timm's default tag. Each lives in the hub repository
`timm/<name>.<tag>`, cached under `$HF_HOME/hub` (or `$HF_HUB_CACHE`). Compute nodes often have no internet:
there `HF_HUB_OFFLINE=1` and the weights must have been fetched beforehand, on a login node, with
`lacvit-fetch-weights --config <config.yaml>` (tools/fetch_weights.py). This module resolves a name to its
hub file, says whether it is cached, fetches it (one download per node) and, when it is missing, stops the
run with an error naming the tag, the cache folder and that command."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from lacvit_dist import distributed as dist_utils
from lacvit_dist.config import ConfigError
from lacvit_dist.models.layouts import _pool_norm, _short, head_parameter_names

log = logging.getLogger(__name__)

FETCH_COMMAND = "lacvit-fetch-weights"  # console script of tools/fetch_weights.py (setup.py)


class WeightsMissingError(ConfigError):
    """The pretrained weights a config names are not in the local hub cache and cannot be downloaded."""


@dataclass(frozen=True)
class HubWeights:
    """Where timm reads the weights of `tag` from: the file `filename` of hub repository `repo_id`."""
    tag: str
    repo_id: str
    filename: str
    revision: str | None = None


def resolve(name: str) -> HubWeights:
    """timm's pretrained config for `name` (with or without a tag) -> its hub repository and file."""
    import timm.models

    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.models.is_model(arch):
        raise ConfigError(f"model.name: {name!r} is not a timm model (timm.list_models('vit_*') lists them)")
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise ConfigError(f"model.name: timm has no pretrained weights {name!r} (model.pretrained: true); "
                          f"tags of {arch}: {tags or 'none'}")
    full = f"{arch}.{tag or cfg.tag}"
    if not cfg.hf_hub_id:
        raise ConfigError(f"model.name: timm's weights {full!r} are not on the Hugging Face hub, so they cannot "
                          "be cached for offline nodes; download them yourself and set model.pretrained_path")
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    # timm reads model.safetensors first (load_state_dict_from_hf), unless the config names another file.
    return HubWeights(full, repo_id, cfg.hf_hub_filename or "model.safetensors", revision or None)


def cache_dir() -> Path:
    """The hub cache timm reads: $HF_HUB_CACHE, else $HF_HOME/hub (as huggingface_hub resolved them)."""
    return Path(hf_constants.HF_HUB_CACHE)


def offline() -> bool:
    return bool(hf_constants.HF_HUB_OFFLINE)


def cached_file(weights: HubWeights) -> Path | None:
    """The cached weights file, or None; reads the cache folder only (no network)."""
    found = huggingface_hub.try_to_load_from_cache(weights.repo_id, weights.filename, cache_dir=cache_dir(),
                                                   revision=weights.revision)
    return Path(found) if isinstance(found, str) else None


def missing_error(weights: HubWeights, reason: str = "") -> WeightsMissingError:
    return WeightsMissingError(
        f"model.pretrained: weights {weights.tag!r} ({weights.repo_id}/{weights.filename}) are not in the "
        f"Hugging Face cache {cache_dir()}{' (' + reason + ')' if reason else ''}. On a machine with internet "
        f"that shares this cache (a login node), run: HF_HUB_CACHE={cache_dir()} {FETCH_COMMAND} "
        f"{weights.tag}  (or --config <this config>), then start the run again")


def fetch(name: str) -> Path:
    """Make sure the weights of `name` are cached, downloading them unless HF_HUB_OFFLINE; returns the file."""
    weights = resolve(name)
    found = cached_file(weights)
    if found is not None:
        return found
    if offline():
        raise missing_error(weights, "HF_HUB_OFFLINE=1: nothing is downloaded")
    log.info("downloading %s/%s into %s", weights.repo_id, weights.filename, cache_dir())
    try:
        return Path(huggingface_hub.hf_hub_download(weights.repo_id, weights.filename, revision=weights.revision,
                                                    cache_dir=cache_dir()))
    except (OSError, HfHubHTTPError) as err:
        raise missing_error(weights, f"download failed: {type(err).__name__}: {err}") from err


def ensure_cached(name: str) -> Path:
    """`fetch` on local rank 0 of each node while the other ranks wait, then every rank checks the cache:
    at most one download per node (none offline), and a missing file stops every rank with the same error
    (no rank is left waiting in a collective)."""
    if dist_utils.detect_world().local_rank == 0:
        try:
            fetch(name)
        except WeightsMissingError as err:
            log.error("%s", err)  # every rank raises it below
    dist_utils.barrier()
    weights = resolve(name)
    found = cached_file(weights)
    if found is None:
        raise missing_error(weights, "HF_HUB_OFFLINE=1: nothing is downloaded" if offline() else "")
    return found


def main(argv: list[str] | None = None) -> int:
    """`lacvit-fetch-weights`: cache the pretrained weights of timm tags or of configs (run where there is
    internet, with the HF_HOME the compute nodes will read). Exit 0: all cached; 1: some missing; 2: bad input."""
    import argparse
    import sys

    from lacvit_dist.config import load_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("tags", nargs="*", help="timm names with tags, e.g. vit_base_patch16_224.mae")
    parser.add_argument("--config", action="append", default=[], help="run config (model.pretrained: true)")
    args = parser.parse_args(argv)
    names = list(args.tags)
    try:
        for path in args.config:
            model = load_config(path).model
            if not model.pretrained:
                raise ConfigError(f"{path}: model.pretrained is false, so the run reads no timm weights "
                                  "(set model.pretrained: true, or pass a tag)")
            names.append(model.name)
        if not names:
            raise ConfigError("name a timm tag or pass --config")
        weights = [resolve(name) for name in names]
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = 0
    for w in weights:
        try:
            print(f"{w.tag}: cached at {fetch(w.tag)}")
        except WeightsMissingError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def load_timm_weights(model: nn.Module, name: str, in_chans: int = 3) -> None:
    """timm's pretrained weights for `name` (architecture.tag) into `model`, through timm's own loader from the
    Hugging Face cache (fetched once per node, or an error naming the tag, the cache and the fetch command):
    timm's checkpoint filter resamples position embeddings to the model's img_size and a classifier of
    another class count is dropped. Strict: only the model's classifier head may stay unloaded (a
    checkpoint's final norm initialises fc_norm under global_pool=avg, as for local files)."""
    from timm.models import load_pretrained

    from lacvit_dist.models.pretrained import ensure_cached

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
