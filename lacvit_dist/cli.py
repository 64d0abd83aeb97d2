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
from .checkpoint import changed_settings, rank0_decides
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
        plan = decide_stage(cfg, name, run_dir, results)
        if "finished" in plan:
            results[name] = plan["finished"]
            continue
        torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
        if name == "stage1":
            task = Stage1Contrastive(cfg, info.num_classes)
        elif name == "stage2":
            task = Stage2Linear(cfg, info.num_classes, plan["backbone"])
        else:
            task = BaselineFinetune(cfg, info.num_classes)
        results[name] = train_stage(cfg, task, info, run_dir / name)
        if dist_utils.rank() == 0:
            write_summary(results, run_dir / "summary.csv")
    return results


def decide_stage(cfg: Config, name: str, run_dir: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What every rank does about stage `name`, decided by rank 0 from its view of `run_dir` and broadcast
    (ranks reading a shared file system each for themselves may disagree, and then deadlock): {"finished":
    its results} to skip it, {"backbone": path} to train stage 2 on that file, {} to train. A collective; a
    refusal (ConfigError) is raised on every rank."""
    return rank0_decides(lambda: _decide_stage(cfg, name, run_dir, results))


def _decide_stage(cfg: Config, name: str, run_dir: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    stage_dir = run_dir / name
    finished = stage_dir / "results.json"
    if finished.exists():  # a restarted job: never redo (or overwrite) a finished stage
        try:
            recorded = json.loads(finished.read_text())
        except ValueError as err:
            raise ConfigError(f"run.name: {finished} is not readable JSON ({err}); move {stage_dir} away to "
                              f"redo {name}") from None
        differences = finished_stage_differences(cfg, name, stage_dir, recorded)
        if differences and not cfg.run.reuse_finished_stages:
            raise ConfigError(_changed_settings_message(name, run_dir, differences))
        if differences:
            log.warning("%s: already finished in %s with other settings (%s); kept as it is because "
                        "run.reuse_finished_stages is true", name, stage_dir, "; ".join(differences))
        else:
            log.info("%s: already finished in %s with the same settings, skipped", name, stage_dir)
        return {"finished": recorded}
    if name != "stage2":
        return {}
    backbone = cfg.stage2.backbone_path or results.get("stage1", {}).get("export") \
        or str(run_dir / "stage1" / "backbone.safetensors")
    if not Path(backbone).is_file():
        raise ConfigError(f"stage2.backbone_path: {backbone} does not exist (run stage1 first, or set it)")
    return {"backbone": backbone}


def finished_stage_differences(cfg: Config, name: str, stage_dir: Path, results: dict[str, Any]) -> list[str]:
    """The settings that shaped a finished stage's result (`checkpoint.stage_settings`) that `cfg` changes, as
    'key: recorded -> now', read from the manifest beside the stage's export (its "config", written before
    results.json)."""
    manifest = stage_dir / Path(results.get("export") or "export.safetensors").with_suffix(".json").name
    try:
        recorded = json.loads(manifest.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"(the settings it ran with are unknown: {manifest} is missing or records no config)"]
    return changed_settings(recorded, cfg, name)


def _changed_settings_message(name: str, run_dir: Path, differences: list[str]) -> str:
    reuse_backbone = (f" (run.stages=[stage2] stage2.backbone_path={run_dir / 'stage1' / 'backbone.safetensors'} "
                      "trains stage 2 there on this run's stage-1 backbone)" if name == "stage2" else "")
    return (f"run.name: {name} already finished in {run_dir / name} with other settings than this config's: "
            f"{'; '.join(differences)} (finished -> now). Skipping it would report results this config did not "
            f"produce. Either start a new run with another run.name{reuse_backbone}, or keep the finished "
            f"{name} as it is with run.reuse_finished_stages=true")


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
        dist_utils.resolve_device(cfg.run.device)
    except ConfigError as err:
        if world.rank == 0:
            print(f"config error: {err}", file=sys.stderr)
        return 2
    with dist_utils.job(cfg.run.device, cfg.deepspeed.backend):
        try:
            results = run(cfg)
        except StopRequested:
            return REQUEUE_EXIT_CODE
        except (ConfigError, FileNotFoundError, ValueError) as err:
            log.error("error: %s", err)
            print(f"error: {err}", file=sys.stderr)
            return 2
    if world.rank == 0:
        print(format_table(results), flush=True)
    return 0
