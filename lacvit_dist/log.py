"""TensorBoard and console logging, progress bars; only rank 0 writes."""
from __future__ import annotations

import logging
import sys
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from torch.utils.tensorboard import SummaryWriter

from lacvit_dist import distributed as dist_utils
from lacvit_dist.evaluation.metrics import pr_curves, pr_histograms

PR_CURVE_CLASSES = 20  # per-class PR curves: every class up to this many, else this many worst by recall

log = logging.getLogger("lacvit_dist")


def setup_console(rank: int) -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings, prefixed with their rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


class TensorBoard:
    """Scalars and images grouped per stage ("stage1/train/loss"); a no-op on ranks other than 0."""

    def __init__(self, log_dir: Path | None, stage: str):
        self.stage = stage
        self.writer = SummaryWriter(str(log_dir)) if log_dir is not None else None

    def scalars(self, values: dict, step: int, group: str = "train") -> None:
        """Logs the numeric entries of `values` (lists such as per-class accuracy are skipped)."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.stage}/{group}/{key}", value, step)

    def figure(self, name: str, build, *args: Any, step: int, group: str, **kwargs: Any) -> None:
        """``build(*args, **kwargs)`` (a :mod:`lacvit_dist.evaluation.figures` builder) rendered into TensorBoard; the
        figure is built only where a writer is, so other ranks pay nothing."""
        if self.writer is not None:
            self.writer.add_figure(f"{self.stage}/{group}/{name}", build(*args, **kwargs), step, close=True)

    def classifier_figures(self, metrics: dict, class_names: Sequence[str], histograms: torch.Tensor | None,
                           step: int, group: str) -> None:
        """Confusion matrix, sorted per-class accuracy, the most-confused pairs as text, and PR curves."""
        if self.writer is None:
            return
        from lacvit_dist.evaluation.figures import confusion_figure, most_confused, per_class_figure  # matplotlib: only when drawing
        self.figure("confusion", confusion_figure, metrics["confusion"], class_names, title=f"{group} confusion",
                    step=step, group=group)
        self.figure("per_class_accuracy", per_class_figure, metrics["per_class_accuracy"], class_names,
                    support=metrics["support"], title=f"{group} per-class accuracy", step=step, group=group)
        pairs = most_confused(metrics["confusion"], class_names)
        self.writer.add_text(f"{self.stage}/{group}/most_confused", "\n".join(
            ["| true | predicted | rate | count |", "|---|---|---|---|"]
            + [f"| {t} | {p} | {r:.3f} | {n} |" for t, p, r, n in pairs]), step)
        if histograms is not None:
            self.pr_curves(histograms, class_names, metrics["per_class_accuracy"], metrics["support"], step, group)

    def pr_curves(self, histograms: torch.Tensor, class_names: Sequence[str], recall: Sequence[float],
                  support: Sequence[int], step: int, group: str) -> None:
        """One-vs-rest PR curves from summed :func:`lacvit_dist.evaluation.metrics.pr_histograms`: all classes pooled
        (micro-average) and per class, every class up to ``PR_CURVE_CLASSES``, beyond that the
        ``PR_CURVE_CLASSES`` worst by recall: 200 charts are not browsable, and the worst classes are the
        ones a researcher opens."""
        if self.writer is None:
            return
        present = [c for c in range(len(class_names)) if support[c] > 0]
        chosen = present if len(class_names) <= PR_CURVE_CLASSES else sorted(
            present, key=lambda c: (recall[c], c))[:PR_CURVE_CLASSES]
        self._pr_curve("pr_curves/all_classes", histograms.sum(dim=1, keepdim=True), step, group)
        for c in chosen:
            self._pr_curve(f"pr_curves/{c:04d}_{class_names[c]}", histograms[:, c:c + 1], step, group)

    def _pr_curve(self, name: str, histograms: torch.Tensor, step: int, group: str) -> None:
        curve = {k: v[0].numpy() for k, v in pr_curves(histograms.cpu()).items()}
        self.writer.add_pr_curve_raw(f"{self.stage}/{group}/{name}", curve["tp"], curve["fp"], curve["tn"],
                                     curve["fn"], curve["precision"], curve["recall"], step,
                                     num_thresholds=histograms.shape[-1])

    def embedding_figures(self, embeddings: dict[str, torch.Tensor], class_names: Sequence[str],
                          history: list[dict], step: int, group: str) -> None:
        """Stage 1: PCA of the backbone embeddings by class, and the health monitor over training."""
        if self.writer is None:
            return
        from lacvit_dist.evaluation.figures import embedding_figure, health_figure  # matplotlib: only when drawing
        self.figure("embeddings_pca", embedding_figure, embeddings["backbone"], embeddings["labels"], class_names,
                    title=f"{group} backbone embeddings (PCA)", step=step, group=group)
        self.figure("embedding_health", health_figure, history, title=f"{group} embedding health over training",
                    step=step, group=group)

    def embedding(self, name: str, features: "torch.Tensor", labels: list[str], step: int, group: str) -> None:
        """The projector view of a sample of embeddings, labelled by class name."""
        if self.writer is not None:
            self.writer.add_embedding(features, metadata=labels, global_step=step,
                                      tag=f"{self.stage}/{group}/{name}")

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """Hyper-parameters with the stage's final metrics (TensorBoard's HPARAMS tab)."""
        if self.writer is not None:
            numeric = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.writer.add_hparams(hparams, numeric, run_name="hparams")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class PRTally:
    """PR-curve histograms of one classifier evaluation pass, without a second pass over the data.

    ``tap(model, batches)`` yields the batches unchanged, queueing each one's labels, while a forward hook
    on ``model`` bins the softmax of every output against the labels of its batch
    (:func:`lacvit_dist.evaluation.metrics.pr_histograms`). ``histograms()`` sums them over ranks (a collective)."""

    def __init__(self, num_classes: int, num_thresholds: int = 127):
        self.num_classes, self.num_thresholds = num_classes, num_thresholds
        self.counts: torch.Tensor | None = None
        self._labels: deque[torch.Tensor] = deque()

    def _on_forward(self, module, inputs, logits: torch.Tensor) -> None:
        if not self._labels:  # a forward outside the tapped pass
            return
        labels = self._labels.popleft().to(logits.device)
        counts = pr_histograms(logits.detach().float().softmax(dim=-1), labels, self.num_thresholds)
        self.counts = counts if self.counts is None else self.counts + counts

    def tap(self, model: torch.nn.Module, batches: Iterable) -> Iterator:
        handle = model.register_forward_hook(self._on_forward)
        try:
            for batch in batches:
                self._labels.append(batch[1])
                yield batch
        finally:
            handle.remove()

    def histograms(self) -> torch.Tensor:
        """The pass's ``[2, C, T]`` counts summed over ranks (every rank must call it)."""
        local = self.counts if self.counts is not None else torch.zeros(
            2, self.num_classes, self.num_thresholds, dtype=torch.long)
        return dist_utils.all_reduce_sum(local.to(dist_utils.collective_device())).cpu()


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "batch") -> Iterable:
    """A tqdm bar on stderr for rank 0's long loops (other ranks: the iterable itself); on a log file
    rather than a terminal it updates every 30 s instead of 10 times a second."""
    if dist_utils.rank() != 0:
        return iterable
    return _bar(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def _bar(iterable: Iterable, **kwargs: Any) -> Iterator:
    # A generator: the bar appears when the loop starts, not when the loader is built (a kNN bank and its
    # queries are built together but read one after the other).
    yield from tqdm(iterable, **kwargs)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A markdown table (console summaries, benchmark and experiment reports). `align`: "l" or "r" per column
    (numbers read best right-aligned); columns past its end are left-aligned."""
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def figure_or(value: float | None, spec: str, missing: str = "-") -> str:
    """`value` formatted with `spec` for a table cell, or `missing` when there is no figure."""
    return missing if value is None else format(value, spec)


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s', '12s': an ETA a person reads at a glance."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
