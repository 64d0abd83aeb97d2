"""`lacvit-evaluate` (tools/evaluate.py): evaluate any exported stage output on any split of a shard set.

* a classifier (`<run>/stage2/timm`, `<run>/baseline/timm`): Top-1/Top-5, loss, per-class accuracy, confusion
  matrix (JSON + PNG images);
* `--embeddings` (or a stage-1 backbone, `<run>/stage1/timm`): kNN accuracy (bank = the train split), embedding
  health of the split's embeddings, and a 2-D PCA plot coloured by class.

timm builds the model from the export folder's config.json (`timm.create_model("local-dir:...")`). Runs as one
process, or under torchrun / the deepspeed launcher (each rank evaluates its share; every sample counted once).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import timm
import torch

from lacvit_dist import distributed as dist_utils
from lacvit_dist.data.pipeline import eval_loader
from lacvit_dist.data.shards import DatasetInfo, load_info
from lacvit_dist.data.transforms import evaluation
from lacvit_dist.evaluation.passes import evaluate_classifier, evaluate_embeddings
from lacvit_dist.evaluation.figures import confusion_figure, embedding_figure, most_confused, per_class_figure, save_figure
from lacvit_dist.models.factory import image_stats
from lacvit_dist.log import progress
from lacvit_dist.models.export import read_manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a stage's export folder (<run>/<stage>/timm)")
    parser.add_argument("--data", required=True, type=Path, help="shard folder with _info.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--bank-split", default="train", help="kNN memory bank split (--embeddings)")
    parser.add_argument("--embeddings", action="store_true", help="also kNN, embedding health and a 2-D plot")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="output folder (default: <checkpoint folder>/eval-<split>)")
    return parser.parse_args(argv)


def load_exported(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of an export folder (<run>/<stage>/timm, lacvit_dist.models.export), built by timm from its
    config.json with the weights loaded by timm itself, and our manifest (stage, step, config)."""
    manifest = read_manifest(path)
    if not manifest:
        raise FileNotFoundError(f"{path} is not an export folder of this project (no {path / 'config.json'} "
                                "with a 'lacvit' manifest); each stage writes one: <run>/<stage>/timm")
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval(), manifest


def shown_loader(info: DatasetInfo, split: str, transform, batch_size: int, workers: int, what: str):
    """The eval loader of this rank's share of `split`, with a progress bar on rank 0 (its total: the batches
    of an even share, exact on one rank)."""
    share = -(-info.split(split).num_samples // dist_utils.world_size())
    loader = eval_loader(info.split(split), info.num_classes, transform, batch_size, rank=dist_utils.rank(),
                         world_size=dist_utils.world_size(), num_workers=workers)
    return progress(loader, f"{what} {split}", total=-(-share // batch_size))


def backbone_embedding_report(model: torch.nn.Module, info: DatasetInfo, split: str, bank_split: str,
                              device: torch.device, batch_size: int = 128,
                              workers: int = 2) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """kNN Top-1 (bank: `bank_split`) and embedding health of a timm model's pooled features (pre-logits) on
    `split`, each rank embedding its share; returns the metrics and the gathered embeddings + labels."""
    transform = evaluation(image_stats(model))

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"backbone": model.forward_head(model.forward_features(images), pre_logits=True)}

    expected = (info.split(bank_split).num_samples, info.split(split).num_samples)
    with torch.no_grad():
        return evaluate_embeddings(encode, shown_loader(info, bank_split, transform, batch_size, workers, "embed"),
                                   shown_loader(info, split, transform, batch_size, workers, "embed"), device,
                                   torch.float32, info.num_classes, expected, f"split {split!r} of {info.root}",
                                   bank_where=f"split {bank_split!r} of {info.root} (kNN bank)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with dist_utils.job() as job:  # under NCCL, each rank on its own GPU
        return _evaluate(args, job)


def _evaluate(args: argparse.Namespace, job: dist_utils.Job) -> int:
    world, device = job.world, job.device
    try:
        model, manifest = load_exported(args.checkpoint)
        info = load_info(args.data)
        out = args.out or args.checkpoint.parent / f"eval-{args.split}"
        if world.is_main and out.exists():
            raise FileExistsError(f"{out} exists; nothing is overwritten (pass another --out)")
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.to(device)
    transform = evaluation(image_stats(model))

    where = f"split {args.split!r} of {info.root}"
    results: dict[str, Any] = {"checkpoint": str(args.checkpoint), "split": args.split, "stage": manifest["stage"]}
    if manifest["stage"] != "stage1":
        results["classification"] = evaluate_classifier(model, shown_loader(
            info, args.split, transform, args.batch_size, args.workers, "classify"), device, torch.float32,
                                                        info.num_classes, info.split(args.split).num_samples, where)
    if args.embeddings or manifest["stage"] == "stage1":
        results["embeddings"], embeddings = backbone_embedding_report(
            model, info, args.split, args.bank_split, device, args.batch_size, args.workers)
    if world.is_main:
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        if "classification" in results:
            cls = results["classification"]
            save_figure(confusion_figure(cls["confusion"], info.class_names, title=f"{args.split} confusion"),
                        out / "confusion.png")
            save_figure(per_class_figure(cls["per_class_accuracy"], info.class_names, support=cls["support"],
                                         title=f"{args.split} per-class accuracy"), out / "per_class_accuracy.png")
            for true, pred, rate, count in most_confused(cls["confusion"], info.class_names, top=5):
                print(f"{args.split}: {rate:.1%} of {true} predicted as {pred} ({count})")
            print(f"{args.split}: top1 {cls['top1']:.4f}  top5 {cls['top5']:.4f}  loss {cls['loss']:.4f}  "
                  f"({cls['samples']} samples)")
        if "embeddings" in results:
            save_figure(embedding_figure(embeddings["backbone"], embeddings["labels"], info.class_names,
                                         title=f"{args.split} embeddings (PCA)"), out / "embeddings_pca.png")
            emb = results["embeddings"]
            print(f"{args.split}: kNN top1 {emb['knn_top1']:.4f}  " + "  ".join(
                f"{k.split('/')[-1]} {v:.4g}" for k, v in emb.items() if k.startswith("backbone/")))
        print(f"wrote {out}")
    return 0
