"""Classification evaluation over a whole split: every sample exactly once across ranks, counts summed
with all-reduce, and a hard error if the count differs from the split's size."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist_utils


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable, device: torch.device, dtype: torch.dtype,
                        expected_samples: int, where: str) -> dict[str, float]:
    """Top-1, Top-5 (Top-k with k = min(5, classes)) and mean cross-entropy over the split."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # samples, top1, top5, loss sum
    for images, labels, _ in batches:
        logits = model(images.to(device, dtype)).float()
        labels = labels.to(device)
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hits = topk == labels[:, None]
        totals += torch.stack([
            torch.tensor(float(labels.numel()), device=device, dtype=torch.float64),
            hits[:, 0].sum().double(), hits.any(-1).sum().double(),
            F.cross_entropy(logits, labels, reduction="sum").double()])
    model.train(was_training)
    samples, top1, top5, loss = dist_utils.all_reduce_sum(totals).tolist()
    if int(samples) != expected_samples:
        raise RuntimeError(f"evaluation of {where} saw {int(samples)} samples, the split has {expected_samples}")
    return {"top1": top1 / samples, "top5": top5 / samples, "loss": loss / samples, "samples": int(samples)}
