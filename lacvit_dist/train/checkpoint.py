"""Training checkpoints: atomic, complete or never used, resumable on every rank.

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
"""
from __future__ import annotations

import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lacvit_dist.distributed import barrier, gather_objects, rank, rank0_decides, world_size
from lacvit_dist.io import fsync_tree, write_json, write_text

log = logging.getLogger(__name__)


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
    if rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():
            log.warning("checkpoint %s exists (%s); it is replaced", tag_dir,
                        "complete" if is_complete(ckpt_dir, tag) else "incomplete, from a crashed save")
            _remove_tag(tag_dir)
    barrier()
    started = time.time()
    ok = engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if ok is False:
        raise CheckpointError(f"DeepSpeed reported a failed save of {tag_dir}")
    barrier()  # every rank's files are written (DeepSpeed's own save also ends in a barrier)
    if rank() == 0:
        fsync_tree(tag_dir)
        world = world_size()
        marker = {"tag": tag, "step": step, "world_size": world, "saved_at": time.time(),
                  "save_seconds": round(time.time() - started, 3),
                  "zero_stage": int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage")
                  else None}
        write_json(tag_dir / COMPLETE_MARKER, marker)
        write_text(ckpt_dir / LATEST, tag + "\n")
        deleted = prune_checkpoints(ckpt_dir, keep_last, protect=(tag,))
        log.info("saved checkpoint %s in %.1f s%s", tag_dir, time.time() - started,
                 f"; removed {deleted}" if deleted else "")
    barrier()
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
    problems = gather_objects(problem)
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


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order, on every rank (a collective). DeepSpeed saves client_state
    only once (data-parallel rank 0), so per-rank streams must travel as this list; restore with
    `set_rng_state(states[rank])`."""
    return gather_objects(rng_state())


