"""`train.py` / `lacvit-train`: read the config, join the job (torchrun, deepspeed launcher, srun or a plain
process), run the configured stages in order and print their results."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist_utils
from .config import Config, ConfigError, load_config, save_config
from .data.shards import load_info
from .engine import StopRequested, train_stage
from .resilience import REQUEUE_EXIT_CODE
from .tasks import BaselineFinetune, Stage1Contrastive, Stage2Linear
from .tb import log, setup_console


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="LaCViT training: stage 1 (label-aware contrastive), stage 2 (linear head on the frozen "
                    "backbone) and the cross-entropy fine-tuning baseline.",
        epilog="Overrides are dotted keys, e.g. stage1.epochs=3 model.overrides.depth=2 deepspeed.precision=bf16")
    parser.add_argument("--config", type=Path, help="YAML run configuration (configs/*.yaml)")
    parser.add_argument("--stages", nargs="+", help="stages to run, in order (default: run.stages)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment is what counts")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return parser.parse_args(argv)


def set_threads(world: dist_utils.WorldInfo) -> None:
    """The deepspeed launcher does not set OMP_NUM_THREADS: share the cores between the local ranks."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
                or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def resolve_device(cfg: Config) -> str:
    if cfg.run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda requested but no GPU is visible")
    return cfg.run.device


def run(cfg: Config) -> dict[str, dict[str, Any]]:
    """Run cfg.run.stages in order inside an initialised process group; returns results per stage."""
    info = load_info(cfg.data.root, allow_pipe_urls=cfg.data.allow_pipe_urls)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if dist_utils.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Every (re)start records what it ran with; the first start's config is kept as config.yaml.
        save_config(cfg, run_dir / ("config.yaml" if not (run_dir / "config.yaml").exists()
                                    else f"config.restart-{time.strftime('%Y%m%d-%H%M%S')}.yaml"))
    results: dict[str, dict[str, Any]] = {}
    for name in cfg.run.stages:
        finished = run_dir / name / "results.json"
        if finished.exists():  # a restarted job: never redo (or overwrite) a finished stage
            results[name] = json.loads(finished.read_text())
            log.info("%s: already finished in %s, skipped", name, finished.parent)
            continue
        torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
        if name == "stage1":
            task = Stage1Contrastive(cfg, info.num_classes)
        elif name == "stage2":
            backbone = cfg.stage2.backbone_path or results.get("stage1", {}).get("export") \
                or str(run_dir / "stage1" / "backbone.safetensors")
            if not Path(backbone).is_file():
                raise ConfigError(f"stage2.backbone_path: {backbone} does not exist (run stage1 first, or set it)")
            task = Stage2Linear(cfg, info.num_classes, backbone)
        else:
            task = BaselineFinetune(cfg, info.num_classes)
        results[name] = train_stage(cfg, task, info, run_dir / name)
        if dist_utils.rank() == 0:
            write_summary(results, run_dir / "summary.csv")
    return results


SUMMARY_COLUMNS = ("stage", "epochs", "steps", "global_batch", "world_size", "contrast_terms", "val_top1",
                   "val_knn_top1", "test_top1", "test_top5", "test_samples", "wall_time_s")


def write_summary(results: dict[str, dict[str, Any]], path: Path) -> None:
    """One row per finished stage (rewritten atomically after each stage)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for name, res in results.items():
            val, test = res.get("val", {}), res.get("test", {})
            writer.writerow({"stage": name, "epochs": res["epochs"], "steps": res["steps"],
                             "global_batch": res["global_batch"], "world_size": res["world_size"],
                             "contrast_terms": res.get("contrast_terms"), "val_top1": val.get("top1"),
                             "val_knn_top1": val.get("knn_top1"), "test_top1": test.get("top1"),
                             "test_top5": test.get("top5"), "test_samples": test.get("samples"),
                             "wall_time_s": round(res["wall_time_s"], 1)})
    os.replace(tmp, path)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| stage | top1 | top5 | test samples | wall time (s) |", "|---|---|---|---|---|"]
    for name, res in results.items():
        test = res.get("test")
        cells = (f"{test['top1']:.4f}", f"{test['top5']:.4f}", str(test["samples"])) if test else ("-", "-", "-")
        rows.append(f"| {name} | {' | '.join(cells)} | {res['wall_time_s']:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = dist_utils.detect_world()
    setup_console(world.rank)
    try:
        overrides = list(args.overrides) + ([f"run.stages=[{','.join(args.stages)}]"] if args.stages else [])
        cfg = load_config(args.config, overrides)
        device = resolve_device(cfg)
    except ConfigError as err:
        if world.rank == 0:
            print(f"config error: {err}", file=sys.stderr)
        return 2
    set_threads(world)
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
    backend = cfg.deepspeed.backend if cfg.deepspeed.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    dist_utils.init_distributed(world, backend)
    try:
        results = run(cfg)
    except StopRequested:
        return REQUEUE_EXIT_CODE
    except (ConfigError, FileNotFoundError, ValueError) as err:
        log.error("error: %s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if world.rank == 0:
        print(format_table(results), flush=True)
    return 0
