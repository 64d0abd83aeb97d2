"""`tools/reproduce_small.py`: the paper's transfer claim, measured at a small scale on real data.

1. Pretrain a ViT with cross-entropy on the SOURCE classes of a shard set (default: digits 0-4).
2. On the TARGET classes (default: the rest, digits 5-9), with the shard set's fixed stratified
   train/val/test split restricted to those classes, compare at equal epoch budget
   * CE full fine-tuning of the pretrained backbone (baseline: stage1 + stage2 epochs), and
   * LaCViT: stage 1 (label-aware contrastive) then stage 2 (linear head on the frozen backbone).
3. Hyper-parameters (`--grid`) are chosen per method by Top-1 on the target VAL split with the first seed;
   the chosen setting is then run with every seed. Test Top-1 is reported as mean and sample std over seeds;
   the test split is read only to report.
4. Embedding health (kNN Top-1 with the train split as the bank, mean cosine, isotropy, effective rank,
   alignment, uniformity) of the pretrained, CE fine-tuned and LaCViT backbones on the target test split.

Writes results.json, results.md (tables) and reproduce_small.png (Top-1 bars, PCA of the embeddings) under
--out. Every training run is an ordinary train.py run folder under --out/runs (TensorBoard included), and a
restarted experiment skips the runs that finished. One process, or any launcher for several ranks:

    .venv/bin/python tools/reproduce_small.py
    .venv/bin/deepspeed --num_gpus 2 tools/reproduce_small.py --seeds 0 1 2
    torchrun --nproc_per_node 8 tools/reproduce_small.py --data shards/cub200 --config configs/vit_l16.yaml \\
        --source-classes 0-99 model.pretrained_path=weights/mae_vit_large.pth
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lacvit_dist import distributed as dist_utils
from lacvit_dist.io import write_json
from lacvit_dist.models.export import WEIGHTS, export_timm
from lacvit_dist.models.factory import image_stats
from lacvit_dist.cli import run
from lacvit_dist.config import ConfigError, load_config
from lacvit_dist.data.shards import DatasetInfo, load_info
from lacvit_dist.data.subsets import parse_classes, write_class_subset
from lacvit_dist.evaluation.figures import reproduce_figure, save_figure
from lacvit_dist.evaluation.offline import backbone_embedding_report, load_exported
from lacvit_dist.log import log, markdown_table, setup_console

REPO = Path(__file__).resolve().parent.parent
METHODS = {"ce": ["baseline"], "lacvit": ["stage1", "stage2"]}
TITLES = {"ce": "CE full fine-tuning", "lacvit": "LaCViT (stage 1 + stage 2)"}
# Four candidates per method: CE's one learning rate against LaCViT's two stages' learning rates.
DEFAULT_GRID = ["baseline.optimizer.lr=0.0003,0.001,0.003,0.01", "stage1.optimizer.lr=0.001,0.003",
                "stage2.optimizer.lr=0.1,1.0"]
HEALTH_KEYS = ("knn_top1", "mean_cosine", "isotropy", "effective_rank", "alignment", "uniformity")
BACKBONES = {"pretrained": "pretrained (CE on source)", "ce": "CE fine-tuned", "lacvit": "LaCViT stage 1"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "digits",
                        help="shard set with train/val/test splits (default: the digits, sharded if missing)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo_digits.yaml",
                        help="run configuration, e.g. configs/vit_l16.yaml for the GPU experiment")
    parser.add_argument("--source-classes", default="0-4", help="classes to pretrain on, e.g. 0-4 or 0,2,4")
    parser.add_argument("--target-classes", help="classes to transfer to (default: all the others)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, help="default: the config's baseline.epochs")
    parser.add_argument("--stage1-epochs", type=int, help="default: the config's stage1.epochs")
    parser.add_argument("--stage2-epochs", type=int, help="default: the config's stage2.epochs")
    parser.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                        help="values to choose from on the val split; a stage1./stage2. key tunes LaCViT, a "
                             f"baseline. key the CE baseline; repeatable (default: {' '.join(DEFAULT_GRID)})")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce_small")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. model.overrides.depth=2")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: {args.seeds} repeats a seed")
    return args


# ------------------------------------------------------------------------------------------------ grid
def parse_grid(specs: list[str]) -> dict[str, list[dict[str, str]]]:
    """KEY=V1,V2 specs -> every combination per method, in the order given (the first wins ties)."""
    values: dict[str, dict[str, list[str]]] = {method: {} for method in METHODS}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        method = next((m for m, stages in METHODS.items() if key.split(".")[0] in stages), None)
        if not sep or not raw or method is None:
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2 with KEY under stage1., stage2. or baseline.")
        if key in values[method]:
            raise ConfigError(f"--grid {spec!r}: {key} is given twice")
        values[method][key] = [v.strip() for v in raw.split(",")]
    return {method: [dict(zip(keys, combo)) for combo in itertools.product(*keys.values())]
            for method, keys in values.items()}


def choose(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the best val Top-1; the earliest one on a tie (never a test figure)."""
    return max(candidates, key=lambda c: c["val_top1"])  # max() keeps the first of equal keys


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _tag(hp: dict[str, str]) -> str:
    return "-".join(f"{key}={value}" for key, value in hp.items()) or "default"


# ------------------------------------------------------------------------------------------ experiment
@dataclass
class Experiment:
    args: argparse.Namespace
    source: DatasetInfo
    target: DatasetInfo
    epochs: dict[str, int]
    planned_runs: int = 0  # for "run k of N" in the log
    started_runs: int = 0

    @property
    def runs(self) -> Path:
        return self.args.out / "runs"

    def train(self, name: str, stages: list[str], overrides: list[str]) -> dict[str, dict[str, Any]]:
        """One train.py run (in this process group); a finished run folder is reused, not retrained."""
        cfg = load_config(self.args.config, [*self.args.overrides, *overrides, f"run.stages=[{','.join(stages)}]",
                                             f"run.output_dir={self.runs}", f"run.name={name}"])
        self.started_runs += 1
        log.info("reproduce_small: run %d of %d: %s", self.started_runs, self.planned_runs, name)
        return run(cfg)

    def pretrain(self) -> tuple[Path, dict[str, Any]]:
        """CE on the source classes; the classifier's backbone (head removed) is the transfer start point."""
        results = self.train("pretrain", ["baseline"], [f"data.root={self.source.root}",
                                                        f"baseline.epochs={self.epochs['pretrain']}"])["baseline"]
        path = self.args.out / "pretrained_backbone"  # an export folder, as the stages write
        if dist_utils.rank() == 0 and not path.exists():
            model, manifest = load_exported(Path(results["export"]))
            model.reset_classifier(0)
            export_timm(model, model.state_dict(), path, stats=image_stats(model),
                        manifest={**manifest, "stage": "pretrain", "classes": self.source.class_names})
        dist_utils.barrier()
        return path, results

    def finetune(self, method: str, hp: dict[str, str], seed: int, pretrained: Path) -> dict[str, Any]:
        e = self.epochs
        results = self.train(f"{method}-{_tag(hp)}-seed{seed}", METHODS[method], [
            f"data.root={self.target.root}", f"model.pretrained_path={pretrained / WEIGHTS}", f"run.seed={seed}",
            f"stage1.epochs={e['stage1']}", f"stage2.epochs={e['stage2']}", f"baseline.epochs={e['baseline']}",
            *(f"{key}={value}" for key, value in hp.items())])
        final = results[METHODS[method][-1]]
        backbone = results["stage1"]["export"] if method == "lacvit" else final["export"]
        return {"hp": hp, "seed": seed, "val_top1": final["val"]["top1"], "test_top1": final["test"]["top1"],
                "test_samples": final["test"]["samples"], "backbone": backbone}

    def health(self, checkpoint: Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """kNN (bank: target train) and embedding health of the backbone on the target test split."""
        model, _ = load_exported(checkpoint)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # workers=0: loaders created back to back fork while the previous one's queue threads are still
        # exiting, which deadlocked a worker at fork on Python 3.11.7 (CPython gh-112275; seen once here).
        metrics, embeddings = backbone_embedding_report(model.to(device), self.target, "test", "train", device,
                                                        workers=0)
        return {key: metrics[key if key == "knn_top1" else f"backbone/{key}"] for key in HEALTH_KEYS}, embeddings


def prepare_data(args: argparse.Namespace) -> tuple[DatasetInfo, DatasetInfo]:
    """Source and target class subsets of --data, written once by rank 0 under --out/data."""
    if dist_utils.rank() == 0 and args.data == REPO / "data" / "digits" and not (args.data / "_info.json").exists():
        from lacvit_dist.data.make_shards import main as make_shards
        if make_shards(["digits", "--out", str(args.data), "--quiet"]) != 0:
            raise RuntimeError("could not shard the digits")
    dist_utils.barrier()
    full = load_info(args.data)
    source = parse_classes(args.source_classes, full.num_classes)
    target = (parse_classes(args.target_classes, full.num_classes) if args.target_classes
              else [c for c in range(full.num_classes) if c not in source])
    if set(source) & set(target):
        raise ConfigError(f"--source-classes and --target-classes share classes {sorted(set(source) & set(target))}")
    if len(target) < 2:
        raise ConfigError(f"the target task needs at least 2 classes, got {target}")
    for split in ("train", "val", "test"):
        full.split(split)  # a clear error now, not after pretraining
    if dist_utils.rank() == 0:
        write_class_subset(full, source, args.out / "data" / "source", f"{full.name}-source")
        write_class_subset(full, target, args.out / "data" / "target", f"{full.name}-target")
    dist_utils.barrier()
    return load_info(args.out / "data" / "source"), load_info(args.out / "data" / "target")


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    base = load_config(args.config, list(args.overrides))
    source, target = prepare_data(args)
    epochs = {"pretrain": args.pretrain_epochs or base.baseline.epochs,
              "stage1": args.stage1_epochs or base.stage1.epochs, "stage2": args.stage2_epochs or base.stage2.epochs}
    # Equal budget: the baseline trains as many epochs as LaCViT's two stages together (the frozen-backbone
    # stage 2 is much cheaper, so this favours the baseline if anything).
    epochs["baseline"] = epochs["stage1"] + epochs["stage2"]
    grid = parse_grid(args.grid or DEFAULT_GRID)
    # Pretraining, every grid candidate with the first seed, the chosen ones with the other seeds.
    exp = Experiment(args, source, target, epochs,
                     planned_runs=1 + sum(len(grid[m]) + len(args.seeds) - 1 for m in METHODS))
    pretrained, pretrain_results = exp.pretrain()

    first, *others = args.seeds
    selection = {m: [exp.finetune(m, hp, first, pretrained) for hp in grid[m]] for m in METHODS}
    chosen = {m: choose(selection[m]) for m in METHODS}
    per_seed = {m: [chosen[m]] + [exp.finetune(m, chosen[m]["hp"], seed, pretrained) for seed in others]
                for m in METHODS}

    health, embeddings = {}, {}
    health["pretrained"], embeddings["pretrained"] = exp.health(pretrained)
    for m in METHODS:
        reports = [exp.health(Path(r["backbone"])) for r in per_seed[m]]
        health[m] = {key: statistics.fmean(rep[key] for rep, _ in reports) for key in HEALTH_KEYS}
        embeddings[m] = reports[0][1]  # the first seed's, for the plot

    methods = {}
    for m in METHODS:
        tops = [r["test_top1"] for r in per_seed[m]]
        mean, std = mean_std(tops)
        methods[m] = {"title": TITLES[m], "hp": chosen[m]["hp"], "val_top1_chosen": chosen[m]["val_top1"],
                      "seeds": args.seeds, "test_top1": tops, "test_top1_mean": mean, "test_top1_std": std,
                      "test_samples": per_seed[m][0]["test_samples"], "runs": per_seed[m]}
    return {"data": str(args.data), "config": str(args.config), "overrides": list(args.overrides),
            "source_classes": list(source.class_names), "target_classes": list(target.class_names),
            "target_sizes": {s: target.split(s).num_samples for s in ("train", "val", "test")},
            "epochs": epochs, "pretrain": {"source_val_top1": pretrain_results["val"]["top1"]},
            "selection": {m: [{"hp": c["hp"], "val_top1": c["val_top1"]} for c in selection[m]] for m in METHODS},
            "methods": methods, "health": health, "_embeddings": embeddings}


# ---------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    e, sizes = res["epochs"], res["target_sizes"]
    lines = [
        f"Transfer {','.join(res['source_classes'])} -> {','.join(res['target_classes'])} on {res['data']} "
        f"({res['config']}{' ' + ' '.join(res['overrides']) if res['overrides'] else ''}).",
        f"Pretraining: CE on the source classes, {e['pretrain']} epochs (source val Top-1 "
        f"{res['pretrain']['source_val_top1']:.4f}). Target split: {sizes['train']} train / {sizes['val']} val / "
        f"{sizes['test']} test images. Budget: LaCViT stage 1 {e['stage1']} + stage 2 {e['stage2']} epochs, "
        f"CE fine-tuning {e['baseline']} epochs. Hyper-parameters chosen on val (first seed).",
        "", markdown_table(
            ("method", "test Top-1 mean ± std", "seeds", "per seed", "chosen on val (val Top-1)"),
            [(m["title"], f"{m['test_top1_mean']:.4f} ± {m['test_top1_std']:.4f}", len(m["seeds"]),
              ", ".join(f"{t:.4f}" for t in m["test_top1"]), f"{_tag(m['hp'])} ({m['val_top1_chosen']:.4f})")
             for m in res["methods"].values()]),
        "", "Backbone embeddings of the target test split (kNN bank: target train; LaCViT and CE: mean over seeds):",
        "", markdown_table(("backbone", *HEALTH_KEYS),
                           [(name, *(f"{res['health'][key][k]:.4g}" for k in HEALTH_KEYS))
                            for key, name in BACKBONES.items()])]
    return "\n".join(lines) + "\n"


def figure(res: dict[str, Any]):
    """Top-1 bars with every seed's point, the embedding-health table, and each backbone's PCA."""
    return reproduce_figure(
        [(m["title"], m["test_top1"]) for m in res["methods"].values()],
        {name: res["health"][key] for key, name in BACKBONES.items()}, HEALTH_KEYS,
        [(f"{name} (PCA, test)", res["_embeddings"][key]["backbone"], res["_embeddings"][key]["labels"])
         for key, name in BACKBONES.items()], res["target_classes"])


def write_report(res: dict[str, Any], out: Path) -> str:
    table = markdown(res)
    write_json(out / "results.json", {k: v for k, v in res.items() if not k.startswith("_")})
    (out / "results.md").write_text(table)
    save_figure(figure(res), out / "reproduce_small.png")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    rank = dist_utils.detect_world().rank
    setup_console(rank)
    try:
        cfg = load_config(args.config, list(args.overrides))
        dist_utils.resolve_device(cfg.run.device)
        parse_grid(args.grid or DEFAULT_GRID)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    with dist_utils.job(cfg.run.device, cfg.deepspeed.backend, timeout_s=cfg.run.collective_timeout_s):
        try:
            res = run_experiment(args)
            if rank == 0:
                print(write_report(res, args.out), flush=True)
                print(f"wrote {args.out}/results.md, results.json, reproduce_small.png", flush=True)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
