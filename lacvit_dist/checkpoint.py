"""Checkpoints and stage outputs.

* Stage outputs written atomically: the stage-1 backbone (safetensors + manifest) for stage 2, and the final
  classifier in timm's own state-dict layout (`save_state_dict`, `write_json`).
* Training checkpoints through DeepSpeed's own `engine.save_checkpoint` / `load_checkpoint` (every rank takes
  part, ZeRO partitions included), with crash-safe bookkeeping of our own on top:

      ckpt_dir/
        latest                     <- one line, the tag; replaced atomically, only after a complete save
        step00000100/              <- a DeepSpeed tag folder (mp_rank_*, zero_pp_rank_* files ...)
          lacvit_complete.json     <- written by rank 0 after every rank finished writing; no marker = never resumed
        step00000200/ ...

  DeepSpeed itself writes `latest` with a plain open('w') at the end of its save (not atomic, and before our
  marker could exist), so we call it with save_latest=False. Our `latest` has DeepSpeed's format (the bare tag),
  so DeepSpeed's tools (zero_to_fp32.py) still find it.
* Files a user hands us (a stage-1 backbone, pretrained weights) are read with safetensors or
  torch.load(weights_only=True), never with an unrestricted unpickler (`load_state_dict_file`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .config import Config, deep_merge, to_dict

log = logging.getLogger(__name__)


def _atomic_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `state` as safetensors and a JSON manifest beside it (with the file's sha256), atomically:
    a crash leaves either the previous files or the complete new ones, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(tmp))
    _atomic_replace(tmp, path)
    manifest = {**manifest, "file": path.name, "sha256": sha256(path), "num_tensors": len(state)}
    manifest_path = path.with_suffix(".json")
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _atomic_replace(tmp, manifest_path)
    return path


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(data: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    _atomic_replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# The settings that shaped a stage's result (a restart skips a finished stage only if they still hold)
# ---------------------------------------------------------------------------------------------------------

# Compared for every stage: run.seed and the model, data and deepspeed sections, and the stage's own section,
# except the keys below, which change how a run executes, logs or checkpoints but not what it computes:
# activation checkpointing (identical gradients, tests/test_models.py), the communication backend,
# torch.compile (same graph), permission for pipe: URLs, and the stage's logging interval. Data workers, the
# shuffle buffer and the evaluation interval do count: the training stream and the RNG stream depend on them.
_NOT_SHAPING = ("model.activation_checkpointing", "model.checkpoint_offload", "data.allow_pipe_urls",
                "deepspeed.backend", "deepspeed.compile", "deepspeed.compile_backend")
_STAGE1_ONLY = ("model.proj_hidden_dim", "model.proj_dim")  # the projection head exists in stage 1 only


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


def stage_settings(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The settings that shaped `stage`'s result, as dotted keys, from a config dict (`to_dict(cfg)`, or the
    one recorded in a stage's manifest)."""
    flat = flatten_settings({key: config.get(key, {}) for key in ("model", "data", "deepspeed", stage)})
    flat["run.seed"] = config.get("run", {}).get("seed")
    ignored = _NOT_SHAPING + (f"{stage}.log_every_steps",) + (() if stage == "stage1" else _STAGE1_ONLY)
    return {key: value for key, value in flat.items() if key not in ignored}


def changed_settings(recorded: dict[str, Any], cfg: Config, stage: str) -> list[str]:
    """The settings that shaped `stage` in a `recorded` config (`to_dict` of the config that ran, read back from
    a manifest or checkpoint) which `cfg` changes, as 'key: recorded -> now'. A key the recorded config lacks
    (added to the schema later) counts at its default."""
    recorded = deep_merge(to_dict(Config()), recorded)
    return settings_differences(stage_settings(recorded, stage), stage_settings(to_dict(cfg), stage))


_UNSET = "(not set)"


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: recorded -> current' for every dotted key whose value differs (or is set on one side only)."""
    return [f"{key}: {json.dumps(recorded.get(key, _UNSET))} -> {json.dumps(current.get(key, _UNSET))}"
            for key in sorted(set(recorded) | set(current)) if recorded.get(key, _UNSET) != current.get(key, _UNSET)]


# ---------------------------------------------------------------------------------------------------------
# Training checkpoints (DeepSpeed engine, every rank)
# ---------------------------------------------------------------------------------------------------------

LATEST = "latest"
COMPLETE_MARKER = "lacvit_complete.json"
TAG_PATTERN = re.compile(r"^step(\d{8,})$")


class CheckpointError(RuntimeError):
    """A training checkpoint is missing, incomplete or cannot be loaded (the message names the folder)."""


def tag_for_step(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step{step:08d}"


def step_of_tag(tag: str) -> int | None:
    """The step a tag of ours encodes ('step00000120' -> 120); None for any other folder name."""
    m = TAG_PATTERN.match(tag)
    return int(m.group(1)) if m else None


def is_complete(ckpt_dir: str | Path, tag: str) -> bool:
    """True if `tag` was saved completely (rank 0 wrote the marker after every rank's files were written)."""
    return (Path(ckpt_dir) / tag / COMPLETE_MARKER).is_file()


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Our complete tags in `ckpt_dir`, oldest first (by step)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None
            and is_complete(ckpt_dir, p.name)]
    return sorted(tags, key=step_of_tag)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file DeepSpeed wrote (it closes them but does not fsync) before the marker vouches for them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    os.fsync(f.fileno())
            except OSError:
                pass
        _fsync_dir(Path(dirpath))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def _remove_tag(tag_dir: Path) -> None:
    # Marker first: a folder half-deleted by a crash is then never taken for a complete checkpoint.
    (tag_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int, protect: tuple[str, ...] = ()) -> list[str]:
    """Delete our tag folders beyond the newest `keep_last` complete ones (keep_last <= 0 keeps all), and
    incomplete ones (debris of crashed saves). Never the tag `latest` names, nor those in `protect`, nor any
    folder whose name is not one of our tags. Call on ONE rank (rank 0). Returns the deleted tags."""
    ckpt_dir = Path(ckpt_dir)
    keep = set(protect)
    latest = _read_latest(ckpt_dir)
    if latest:
        keep.add(latest)
    complete = complete_tags(ckpt_dir)
    if keep_last > 0:
        keep.update(complete[-keep_last:])
    else:
        keep.update(complete)
    deleted = []
    for path in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        if path.is_dir() and step_of_tag(path.name) is not None and path.name not in keep:
            _remove_tag(path)
            deleted.append(path.name)
    return deleted


def save_training_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any],
                             keep_last: int) -> Path:
    """Save a complete training checkpoint as tag `step{step:08d}`; every rank must call this.

    1. rank 0 removes a folder of the same tag left by an earlier (possibly crashed) save, so no stale file
       survives inside the new one;
    2. engine.save_checkpoint(..., save_latest=False) on every rank (DeepSpeed writes its model, optimizer and
       ZeRO partition files and `client_state`, which is saved once, by data-parallel rank 0);
    3. barrier; rank 0 fsyncs the folder, writes the completion marker, then replaces `latest` atomically
       (tmp + fsync + os.replace) and prunes old tags (`prune_checkpoints`);
    4. barrier, so nobody runs ahead (e.g. into a kill) before `latest` is in place.

    An exception or a kill anywhere before step 3 leaves `latest` at the previous complete checkpoint and a
    tag folder without marker, which `find_latest` never picks and the next save/prune removes. If a save
    raises on only one rank, its peers wait in DeepSpeed's collectives until the process-group timeout: a
    failed save is fatal for the job, by design (the previous checkpoint stays the resume point).
    Returns the tag folder.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for_step(step)
    tag_dir = ckpt_dir / tag
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():
            log.warning("checkpoint %s exists (%s); it is replaced", tag_dir,
                        "complete" if is_complete(ckpt_dir, tag) else "incomplete, from a crashed save")
            _remove_tag(tag_dir)
    _barrier()
    started = time.time()
    ok = engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if ok is False:
        raise CheckpointError(f"DeepSpeed reported a failed save of {tag_dir}")
    _barrier()  # every rank's files are written (DeepSpeed's own save also ends in a barrier)
    if _rank() == 0:
        _fsync_tree(tag_dir)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        marker = {"tag": tag, "step": step, "world_size": world, "saved_at": time.time(),
                  "save_seconds": round(time.time() - started, 3),
                  "zero_stage": int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage")
                  else None}
        _write_text_atomic(tag_dir / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True))
        _write_text_atomic(ckpt_dir / LATEST, tag + "\n")
        deleted = prune_checkpoints(ckpt_dir, keep_last, protect=(tag,))
        log.info("saved checkpoint %s in %.1f s%s", tag_dir, time.time() - started,
                 f"; removed {deleted}" if deleted else "")
    _barrier()
    return tag_dir


def find_latest(ckpt_dir: str | Path) -> str | None:
    """The tag to resume from: the one `latest` names if it is complete; otherwise (with a warning) the newest
    complete tag; None if there is none (fresh start). Reads the file system only (no collective)."""
    ckpt_dir = Path(ckpt_dir)
    named = _read_latest(ckpt_dir)
    if named is not None and is_complete(ckpt_dir, named):
        return named
    fallback = complete_tags(ckpt_dir)
    fallback_tag = fallback[-1] if fallback else None
    if named is not None:
        state = "missing" if not (ckpt_dir / named).is_dir() else f"incomplete (no {COMPLETE_MARKER})"
        log.warning("%s names checkpoint %r, which is %s; %s", ckpt_dir / LATEST, named, state,
                    f"falling back to the newest complete checkpoint {fallback_tag!r}" if fallback_tag
                    else "no complete checkpoint exists: starting from scratch")
    elif fallback_tag is not None:
        log.warning("%s is missing but complete checkpoints exist; resuming from the newest, %r",
                    ckpt_dir / LATEST, fallback_tag)
    return fallback_tag


def find_latest_everywhere(ckpt_dir: str | Path) -> str | None:
    """`find_latest` decided by rank 0 and broadcast, so every rank resumes from the same tag even if their
    views of a shared file system differ for a moment. A collective: every rank must call it."""
    return rank0_decides(lambda: find_latest(ckpt_dir))


T = TypeVar("T")


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - sent as text instead
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def rank0_decides(decide: Callable[[], T]) -> T:
    """Run `decide()` on rank 0 only and hand its result, or the exception it raised, to every rank.

    For decisions every rank must take alike (stage finished? backbone present? which checkpoint?): ranks that
    each read a shared file system can see different things for a while (NFS attribute caches, a file written
    a moment ago), and ranks that take different branches deadlock in their next collective. A collective:
    every rank must call it; every rank raises if `decide` raised."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return decide()
    box: list[Any] = [None]
    error: Exception | None = None
    if _rank() == 0:
        try:
            box = [("ok", decide())]
        except Exception as exc:  # noqa: BLE001 - every rank raises it below, not only rank 0
            error, box = exc, [("error", _picklable(exc))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise value
    return value


def load_training_checkpoint(engine, ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    """Restore module, optimizer (incl. ZeRO partitions) and LR scheduler from `ckpt_dir/tag` on every rank;
    returns the client_state saved with it. Raises CheckpointError naming the folder if anything fails.

    DeepSpeed's ZeRO-1/2/3 optimizer partitions are per data-parallel rank: resume with the same world size
    (DeepSpeed's universal checkpoint conversion is the tool for changing it)."""
    tag_dir = Path(ckpt_dir) / tag
    problem = None
    if not tag_dir.is_dir():
        problem = "does not exist"
    elif not is_complete(ckpt_dir, tag):
        problem = f"is incomplete (no {COMPLETE_MARKER}: its save did not finish)"
    # Every rank reads its own files, but all stop together if any rank cannot: one rank failing alone would
    # leave the others waiting in DeepSpeed's collectives until the process-group timeout.
    problems = _gather_objects(problem)
    if any(problems):
        where = "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p)
        raise CheckpointError(f"checkpoint folder {tag_dir} cannot be resumed from ({where})")
    try:
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the folder named
        raise CheckpointError(f"could not load DeepSpeed checkpoint {tag_dir}: {type(exc).__name__}: {exc}") from exc
    if load_path is None:
        raise CheckpointError(f"could not load DeepSpeed checkpoint {tag_dir}: DeepSpeed found no model states "
                              "for this rank (world size or ZeRO stage different from the saving run?)")
    return dict(client_state or {})


# ---------------------------------------------------------------------------------------------------------
# RNG state (for client_state)
# ---------------------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's python `random`, numpy and torch (CPU, and every CUDA device when available) RNG states."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (a CUDA state is restored only when CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank (a collective; [obj] in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order, on every rank (a collective). DeepSpeed saves client_state
    only once (data-parallel rank 0), so per-rank streams must travel as this list; restore with
    `set_rng_state(states[rank])`."""
    return _gather_objects(rng_state())


# ---------------------------------------------------------------------------------------------------------
# Weights handed to us by a user
# ---------------------------------------------------------------------------------------------------------

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
