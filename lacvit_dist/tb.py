"""TensorBoard and console logging; only rank 0 writes."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("lacvit_dist")


def setup_console(rank: int) -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings, prefixed with their rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


class Scalars:
    """Scalar logger grouped per stage ("stage1/train/loss"); a no-op on ranks other than 0."""

    def __init__(self, log_dir: Path | None, stage: str):
        self.stage = stage
        self.writer = SummaryWriter(str(log_dir)) if log_dir is not None else None

    def add(self, values: dict[str, float], step: int, group: str = "train") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{self.stage}/{group}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
