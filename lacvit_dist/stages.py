"""The stages a run can hold, in their running order: the one registry that the config, the trainer, the SLURM
launcher and the tools read."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # also the config section holding its settings and the run-folder subfolder of its outputs
    purpose: str
    trains_on: str | None = None  # the stage whose exported backbone this one starts from


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("stage1", "LaCViT stage 1: backbone + projection head fine-tuned with the label-aware contrastive loss "
                    "(SupCon, negatives gathered from every rank)"),
    Stage("stage2", "LaCViT stage 2: a linear probe, a classifier head trained on the frozen stage-1 backbone",
          trains_on="stage1"),
    Stage("baseline", "the comparison: cross-entropy fine-tuning of backbone + classifier head, all trained"),
)}
STAGE_NAMES = tuple(STAGES)
