"""TensorBoard and console logging; only rank 0 writes."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from torch.utils.tensorboard import SummaryWriter

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

    def image(self, name: str, image: np.ndarray, step: int, group: str) -> None:
        if self.writer is not None:
            self.writer.add_image(f"{self.stage}/{group}/{name}", image, step, dataformats="HWC")

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
