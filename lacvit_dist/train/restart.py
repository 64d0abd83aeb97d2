"""What a restarted run does with each stage: skip one that finished with the same settings, refuse one that
finished with others (unless run.reuse_finished_stages), feed stage 2 the stage-1 backbone, or train. Rank 0
decides from its view of the run folder and every rank follows, and the SLURM launcher asks the same question
before it resubmits."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lacvit_dist.config import Config, ConfigError, deep_merge, flatten_settings, settings_differences, to_dict
from lacvit_dist.distributed import rank0_decides
from lacvit_dist.models.export import EXPORT_DIR, read_manifest
from lacvit_dist.stages import STAGES

log = logging.getLogger(__name__)

# Compared for every stage: run.seed and the model, data and deepspeed sections, and the stage's own section,
# except the keys below, which change how a run executes, logs or checkpoints but not what it computes:
# activation checkpointing (identical gradients, tests/test_models.py), the communication backend,
# torch.compile (same graph), permission for pipe: URLs, and the stage's logging interval. Data workers, the
# shuffle buffer and the evaluation interval do count: the training stream and the RNG stream depend on them.
_NOT_SHAPING = ("model.activation_checkpointing", "model.checkpoint_offload", "data.allow_pipe_urls",
                "deepspeed.backend", "deepspeed.compile", "deepspeed.compile_backend")
_STAGE1_ONLY = ("model.proj_hidden_dim", "model.proj_dim")  # the projection head exists in stage 1 only


def stage_settings(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The settings that shaped `stage`'s result, as dotted keys, from a config dict (`to_dict(cfg)`, or the
    one recorded in a stage's manifest)."""
    flat = flatten_settings({key: config.get(key, {}) for key in ("model", "data", "deepspeed", stage)})
    flat["run.seed"] = config.get("run", {}).get("seed")
    ignored = _NOT_SHAPING + (f"{stage}.log_every_steps",) + (() if stage == "stage1" else _STAGE1_ONLY)
    return {key: value for key, value in flat.items() if key not in ignored}


def changed_settings(recorded: dict[str, Any], cfg: Config, stage: str) -> list[str]:
    """The settings that shaped `stage` in a `recorded` config (`to_dict` of the config that ran, read back from
    a manifest or checkpoint) which `cfg` changes, as 'key: recorded -> now'. A key the recorded config lacks
    (added to the schema later) counts at its default."""
    recorded = deep_merge(to_dict(Config()), recorded)
    return settings_differences(stage_settings(recorded, stage), stage_settings(to_dict(cfg), stage))


def decide_stage(cfg: Config, name: str, run_dir: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What every rank does about stage `name`, decided by rank 0 from its view of `run_dir` and broadcast
    (ranks reading a shared file system each for themselves may disagree, and then deadlock): {"finished":
    its results} to skip it, {"backbone": path} to train stage 2 on that file, {} to train. A collective; a
    refusal (ConfigError) is raised on every rank."""
    return rank0_decides(lambda: stage_plan(cfg, name, run_dir, results))


def stage_plan(cfg: Config, name: str, run_dir: Path, results: dict[str, dict[str, Any]], *,
               input_pending: bool = False) -> dict[str, Any]:
    """`decide_stage` from this process's own view (no collective; the launcher asks it before submitting).
    `input_pending`: the stage this one trains on is about to run too, so its backbone need not exist yet."""
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
    source = STAGES[name].trains_on
    if source is None or input_pending:
        return {}
    # This run folder's own export, never the absolute path its results.json records: after the folder was
    # copied to a new run.name that points into the original run, after a move nowhere.
    own = run_dir / source / EXPORT_DIR
    recorded = results.get(source, {}).get("export")
    if recorded is not None and Path(recorded) != own and not cfg.stage(name).backbone_path:
        log.warning("%s: %s/results.json records its export at %s; training on this run folder's %s", name,
                    source, recorded, own)
    backbone = cfg.stage(name).backbone_path or str(own)
    if not Path(backbone).exists():
        raise ConfigError(f"{name}.backbone_path: {backbone} does not exist (run {source} first, or set it)")
    return {"backbone": backbone}


def finished_stage_differences(cfg: Config, name: str, stage_dir: Path, results: dict[str, Any]) -> list[str]:
    """The settings that shaped a finished stage's result (`stage_settings`) that `cfg` changes, as
    'key: recorded -> now', read from the manifest of the stage's export (its "config", written before
    results.json)."""
    recorded = read_manifest(stage_dir / EXPORT_DIR).get("config")
    if not isinstance(recorded, dict):
        return [f"(the settings it ran with are unknown: {stage_dir / EXPORT_DIR / 'config.json'} is missing or "
                "records no config)"]
    return changed_settings(recorded, cfg, name)


def _changed_settings_message(name: str, run_dir: Path, differences: list[str]) -> str:
    reuse_backbone = (f" (run.stages=[stage2] stage2.backbone_path={run_dir / 'stage1' / EXPORT_DIR} "
                      "trains stage 2 there on this run's stage-1 backbone)" if name == "stage2" else "")
    return (f"run.name: {name} already finished in {run_dir / name} with other settings than this config's: "
            f"{'; '.join(differences)} (finished -> now). Skipping it would report results this config did not "
            f"produce. Either start a new run with another run.name{reuse_backbone}, or keep the finished "
            f"{name} as it is with run.reuse_finished_stages=true")
