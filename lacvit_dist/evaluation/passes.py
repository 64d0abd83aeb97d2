"""Evaluation over whole splits: every sample exactly once across ranks (the loaders guarantee it; the
counts are checked against the split size), per-rank partial results combined with collectives.

* classifiers: Top-1/Top-5, mean cross-entropy, confusion matrix, per-class accuracy;
* stage 1 (no classifier yet): weighted kNN accuracy of backbone embeddings (train split as the memory bank,
  val split as queries) and embedding health of the val embeddings, backbone and projection.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lacvit_dist import distributed as dist_utils
from lacvit_dist.evaluation.metrics import (confusion_matrix, embedding_health, knn_correct, per_class_accuracy,
                                            top1_predictions, topk_correct)


def lockstep(batches: Iterable, empty: Callable[[], tuple]) -> Iterator:
    """This rank's batches, then empty ones until every rank has run out (one tiny all-reduce per batch).

    Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run the same number of
    forwards even when their shares of a split differ by a batch."""
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        flag = torch.tensor([0.0 if batch is None else 1.0])
        if dist_utils.all_reduce_sum(flag.to(dist_utils.collective_device())).item() == 0:
            return
        yield batch if batch is not None else empty()


def at_least_one(batches: Iterable, empty: Callable[[], tuple]) -> Iterator:
    """This rank's batches, or one empty batch if it has none: a rank whose share of a small split is empty
    (fewer samples than ranks x workers) still has [0, d] embeddings for the gathers every rank joins."""
    seen = False
    for batch in batches:
        seen = True
        yield batch
    if not seen:
        yield empty()


def _check_count(samples: int, expected: int, where: str) -> None:
    if samples != expected:
        raise RuntimeError(f"evaluation of {where} saw {samples} samples, the split has {expected}")


def skipped_in_bank(skipped: dict[str, int], bank_samples: int, split_samples: int, where: str) -> dict[str, int]:
    """The kNN bank reads the train split under the training policy (data.on_bad_sample=skip): every sample of
    it was embedded or skipped and counted. Returns the skipped samples per kind, summed over ranks (a
    collective: every rank calls it)."""
    kinds = sorted(skipped)
    local = torch.tensor([float(skipped[kind]) for kind in kinds], dtype=torch.float64)
    totals = [int(v) for v in dist_utils.all_reduce_sum(local.to(dist_utils.collective_device())).tolist()]
    if bank_samples + sum(totals) != split_samples:
        raise RuntimeError(f"evaluation of {where} embedded {bank_samples} samples and skipped {sum(totals)} bad "
                           f"ones, the split has {split_samples}")
    return dict(zip(kinds, totals))


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable, device: torch.device, dtype: torch.dtype,
                        num_classes: int, expected_samples: int, where: str) -> dict:
    """Top-1, Top-5 (k clipped to the number of classes), mean cross-entropy, confusion matrix (rows = true
    class) and per-class accuracy over the whole split. Top-1, Top-5 and the matrix's diagonal follow one rule
    (topk_correct's: a tie with the true class, or a NaN row, is no hit), so Top-1 <= Top-5 even with tied
    bf16 logits, and the diagonal sums to the Top-1 hits."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum
    for images, labels, _ in batches:
        logits = model(images.to(device, dtype)).float()
        labels = labels.to(device)
        confusion += confusion_matrix(top1_predictions(logits, labels), labels, num_classes)
        hits = topk_correct(logits, labels, ks=(1, 5))
        sums += torch.stack([hits[1].double(), hits[5].double(),
                             F.cross_entropy(logits, labels, reduction="sum").double()])
    model.train(was_training)
    confusion = dist_utils.all_reduce_sum(confusion)
    top1, top5, loss = dist_utils.all_reduce_sum(sums).tolist()
    samples = int(confusion.sum())
    _check_count(samples, expected_samples, where)
    accuracy, support = per_class_accuracy(confusion)
    return {"top1": top1 / samples, "top5": top5 / samples, "loss": loss / samples,
            "samples": samples, "per_class_accuracy": accuracy.tolist(), "support": support.tolist(),
            "confusion": confusion.tolist()}


@torch.no_grad()
def embed_split(encode: Callable[[torch.Tensor], dict[str, torch.Tensor]], batches: Iterable,
                device: torch.device, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This rank's share of a split through `encode` (name -> [batch, d] embeddings), and its labels."""
    parts: dict[str, list[torch.Tensor]] = {}
    labels = []
    for images, batch_labels, _ in batches:
        for name, value in encode(images.to(device, dtype)).items():
            parts.setdefault(name, []).append(value.float())
        labels.append(batch_labels.to(device))
    return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(labels)


def evaluate_embeddings(encode: Callable[[torch.Tensor], dict[str, torch.Tensor]], bank_batches: Iterable,
                        query_batches: Iterable, device: torch.device, dtype: torch.dtype, num_classes: int,
                        expected: tuple[int | None, int], where: str, k: int = 20,
                        bank_where: str | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """kNN accuracy of the "backbone" embeddings (bank: every training sample, gathered on every rank;
    queries: this rank's share of the val split, correct counts summed) and embedding health of the gathered
    val embeddings, per embedding name ("backbone/isotropy", "projection/mean_cosine", ...). `where` names the
    query split, `bank_where` the bank's; expected = (bank samples or None when the caller checks them, e.g.
    against skipped bad samples; query samples). "bank_samples" in the results: the bank's size.

    Also returns the gathered query embeddings by name, plus "labels", for plots and the projector."""
    bank, bank_labels = embed_split(encode, bank_batches, device, dtype)
    bank = dist_utils.all_gather_variable(bank["backbone"])
    bank_labels = dist_utils.all_gather_variable(bank_labels)
    query, query_labels = embed_split(encode, query_batches, device, dtype)
    correct = knn_correct(bank, bank_labels, query["backbone"], query_labels, k=k, num_classes=num_classes)
    correct, queries = dist_utils.all_reduce_sum(
        torch.stack([correct.double(), torch.tensor(float(len(query_labels)), device=device, dtype=torch.float64)]))
    if expected[0] is not None:
        _check_count(len(bank_labels), expected[0], bank_where or f"the kNN bank of {where}")
    _check_count(int(queries), expected[1], where)
    results = {"knn_top1": float(correct / queries), "samples": int(queries), "bank_samples": len(bank_labels)}
    gathered = {name: dist_utils.all_gather_variable(values) for name, values in query.items()}
    gathered["labels"] = dist_utils.all_gather_variable(query_labels)
    for name, values in query.items():
        health = embedding_health(gathered[name], gathered["labels"])
        results.update({f"{name}/{key}": value for key, value in health.items()})
    return results, gathered
