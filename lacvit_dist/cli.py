"""`train.py` / `lacvit-train`: read the config, join the job (torchrun, deepspeed launcher, srun or a plain
process), run the configured stages in order and print their results."""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lacvit_dist import distributed as dist_utils
from lacvit_dist.train.restart import decide_stage
from lacvit_dist.config import Config, ConfigError, load_config, save_config
from lacvit_dist.data.checks import check_data
from lacvit_dist.data.shards import load_info
from lacvit_dist.train.loop import StopRequested, train_stage
from lacvit_dist.train.preemption import REQUEUE_EXIT_CODE
from lacvit_dist.train.objectives import build_objective
from lacvit_dist.io import write_text
from lacvit_dist.log import log, markdown_table, setup_console
from lacvit_dist.rank_failures import record_failure


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
    for warning in check_data(cfg, info, dist_utils.rank(), dist_utils.world_size()):  # every shard any stage reads
        log.warning("data: %s", warning)
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
        objective = build_objective(name, cfg, info.num_classes, plan.get("backbone"))
        results[name] = train_stage(cfg, objective, info, run_dir / name)
        if dist_utils.rank() == 0:
            write_summary(results, run_dir / "summary.csv")
    return results


SUMMARY_COLUMNS = ("stage", "epochs", "steps", "global_batch", "world_size", "contrast_terms", "val_top1",
                   "val_knn_top1", "test_top1", "test_top5", "test_samples", "wall_time_s")


def write_summary(results: dict[str, dict[str, Any]], path: Path) -> None:
    """One row per finished stage (rewritten atomically after each stage)."""
    rows = io.StringIO()
    writer = csv.DictWriter(rows, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    for name, res in results.items():
        val, test = res.get("val", {}), res.get("test", {})
        writer.writerow({"stage": name, "epochs": res["epochs"], "steps": res["steps"],
                         "global_batch": res["global_batch"], "world_size": res["world_size"],
                         "contrast_terms": res.get("contrast_terms"), "val_top1": val.get("top1"),
                         "val_knn_top1": val.get("knn_top1"), "test_top1": test.get("top1"),
                         "test_top5": test.get("top5"), "test_samples": test.get("samples"),
                         "wall_time_s": round(res["wall_time_s"], 1)})
    write_text(path, rows.getvalue())


def format_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, res in results.items():
        test = res.get("test")
        cells = (f"{test['top1']:.4f}", f"{test['top5']:.4f}", test["samples"]) if test else ("-", "-", "-")
        rows.append((name, *cells, f"{res['wall_time_s']:.1f}"))
    return markdown_table(("stage", "top1", "top5", "test samples", "wall time (s)"), rows)


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
    # A failure of this rank's own (not a lost peer) is recorded for the launcher, before the process group goes
    # (its peers then see this rank go and leave with 76 as if it had died; a bug must not be retried).
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    try:
        with dist_utils.job(cfg.run.device, cfg.deepspeed.backend, timeout_s=cfg.run.collective_timeout_s):
            try:
                results = run(cfg)
            except StopRequested:
                return REQUEUE_EXIT_CODE
            except (ConfigError, FileNotFoundError, ValueError) as err:
                log.error("error: %s", err)
                print(f"error: {err}", file=sys.stderr)
                record_failure(run_dir, world.rank, f"{type(err).__name__}: {err}")
                return 2
            except Exception as err:
                if not dist_utils.is_lost_peer(err):
                    record_failure(run_dir, world.rank, f"{type(err).__name__}: {err}")
                raise
    except Exception as err:  # a peer died, hung or was cut off: the launcher requeues, the restart resumes
        if not dist_utils.is_lost_peer(err):
            raise
        log.error("rank %d lost a peer in a collective (%s: %s); exiting with code %d for a requeue",
                  world.rank, type(err).__name__, err, dist_utils.LOST_PEER_EXIT_CODE)
        return dist_utils.LOST_PEER_EXIT_CODE
    if world.rank == 0:
        print(format_table(results), flush=True)
    return 0
