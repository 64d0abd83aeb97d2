"""Honest restarts with 2 gloo ranks through the real `cli.run`: a finished stage is skipped only when the settings
that shaped its result still hold (otherwise every rank stops with the differing keys named, or keeps it with
run.reuse_finished_stages=true); settings that do not shape results do not block; and the decisions every rank
must take alike (stage finished, backbone present, checkpoint loadable) follow rank 0's view of the file system,
here made to differ on purpose by giving each rank another folder."""
import json
import shutil

import pytest
from dist_helpers import run_in_processes

from conftest import REPO

TINY = ["run.stages=[stage1]", "model.overrides.embed_dim=32", "model.overrides.depth=1",
        "model.overrides.num_heads=2", "model.proj_dim=16", "data.num_workers=0", "data.shuffle_buffer=50",
        "stage1.epochs=1", "stage1.steps_per_epoch=2", "stage1.micro_batch_size=32", "stage1.log_every_steps=1"]
CHANGED = ["stage1.epochs=2", "model.overrides.depth=2"]
# Where and how the stage runs, logs and checkpoints: none of these may block a restart.
NOT_SHAPING = ["run.checkpoint_every_steps=7", "run.keep_checkpoints=5", "run.stop_check_every_steps=3",
               "run.stop_check_every_s=5", "stage1.log_every_steps=2", "logging.tensorboard=false",
               "deepspeed.backend=gloo", "model.activation_checkpointing=timm"]


def _outcome(fn):
    from lacvit_dist.train.checkpoint import CheckpointError
    from lacvit_dist.config import ConfigError

    try:
        return {"value": fn()}
    except (ConfigError, CheckpointError) as err:
        return {"error": f"{type(err).__name__}: {err}"}


def _restarts(rank, world_size, data_root, out):
    import shutil
    from pathlib import Path

    import torch

    from lacvit_dist.train.checkpoint import load_training_checkpoint
    from lacvit_dist.cli import run
    from lacvit_dist.train.restart import decide_stage
    from lacvit_dist.config import load_config
    from lacvit_dist.distributed import detect_world, init_distributed

    init_distributed(detect_world(), "gloo")
    out = Path(out)

    def cfg(*extra):
        return load_config(REPO / "configs" / "demo_digits.yaml", [
            f"data.root={data_root}", f"run.output_dir={out}", "run.name=run", *TINY, *extra])

    got = {"first": run(cfg())["stage1"]}
    got["changed"] = _outcome(lambda: run(cfg(*CHANGED)))
    got["reused"] = _outcome(lambda: run(cfg(*CHANGED, "run.reuse_finished_stages=true")))
    got["not_shaping"] = _outcome(lambda: run(cfg(*NOT_SHAPING)))

    # An unfinished stage (a copy of the run without its results.json) resumed from its checkpoint with more
    # epochs: the restored step count and LR schedule would belong to neither config.
    if rank == 0:
        shutil.copytree(out / "run", out / "unfinished")
        (out / "unfinished" / "stage1" / "results.json").unlink()
    torch.distributed.barrier()
    got["resumed_changed"] = _outcome(lambda: run(cfg("run.name=unfinished", "stage1.epochs=2")))

    # Divergent views: rank 0 sees the finished run, rank 1 an empty folder (and the other way round).
    finished, empty = out / "run", out / f"empty{rank}"
    mine, other = (finished, empty) if rank == 0 else (empty, finished)
    got["stage1_rank0_finished"] = _outcome(lambda: sorted(decide_stage(cfg(), "stage1", mine, {})))
    got["stage1_rank0_empty"] = _outcome(lambda: sorted(decide_stage(cfg(), "stage1", other, {})))
    got["stage2_rank0_has_backbone"] = _outcome(lambda: decide_stage(cfg(), "stage2", mine, {}))
    got["stage2_rank0_lacks_backbone"] = _outcome(lambda: decide_stage(cfg(), "stage2", other, {}))
    tag = (finished / "stage1" / "checkpoints" / "latest").read_text().strip()
    got["load_where_rank1_lacks_it"] = _outcome(
        lambda: load_training_checkpoint(None, mine / "stage1" / "checkpoints", tag))
    return got


@pytest.fixture(scope="module")
def restarts(digits_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("restart")
    per_rank = run_in_processes(_restarts, 2, str(digits_root), str(out), timeout=600)
    return per_rank, out, out / "run" / "stage1" / "results.json"


def test_changed_settings_stop_every_rank_naming_the_keys(restarts):
    per_rank, out, _ = restarts
    for got in per_rank:
        message = got["changed"]["error"]
        assert message.startswith(f"ConfigError: run.name: stage1 already finished in {out / 'run' / 'stage1'}")
        assert "model.overrides.depth: 1 -> 2; stage1.epochs: 1 -> 2 (finished -> now)" in message
        assert "another run.name" in message and "run.reuse_finished_stages=true" in message
    assert per_rank[0]["changed"] == per_rank[1]["changed"]


def test_unfinished_stage_resumed_with_changed_settings_stops_every_rank(restarts):
    per_rank, out, _ = restarts
    for got in per_rank:
        message = got["resumed_changed"]["error"]
        assert message.startswith(f"ConfigError: run.name: checkpoint {out / 'unfinished' / 'stage1' / 'checkpoints'}")
        assert "saved with other settings: stage1.epochs: 1 -> 2 (saved -> now)" in message


def test_reuse_flag_and_settings_that_do_not_shape_results_skip_the_finished_stage(restarts):
    per_rank, _, results_json = restarts
    recorded = json.loads(results_json.read_text())
    assert recorded["steps"] == 2 and recorded["train_log"] == per_rank[0]["first"]["train_log"]
    for got in per_rank:  # the finished results, as written by the first run, on every rank
        assert got["reused"] == {"value": {"stage1": recorded}}
        assert got["not_shaping"] == {"value": {"stage1": recorded}}, got["not_shaping"]


def test_every_rank_follows_rank0_view_of_the_run_folder(restarts, tmp_path_factory):
    per_rank, out, _ = restarts
    backbone = str(out / "run" / "stage1" / "timm")
    for got in per_rank:
        assert got["stage1_rank0_finished"] == {"value": ["finished"]}  # rank 1 saw no results.json
        assert got["stage1_rank0_empty"] == {"value": []}  # rank 1 saw one: rank 0 decides to train
        assert got["stage2_rank0_has_backbone"] == {"value": {"backbone": backbone}}
        assert got["stage2_rank0_lacks_backbone"]["error"].startswith("ConfigError: stage2.backbone_path: ")
        assert "does not exist" in got["stage2_rank0_lacks_backbone"]["error"]
    assert per_rank[0]["stage2_rank0_lacks_backbone"] == per_rank[1]["stage2_rank0_lacks_backbone"]


def test_stage2_trains_on_the_run_folders_own_backbone(restarts, digits_root, tmp_path):
    """results.json records the stage-1 export as an absolute path: in a run folder copied to a new run.name it
    points into the original (stage 2 would silently train on that run's backbone), after a move nowhere. Stage
    2 takes the folder's own export; only an explicit stage2.backbone_path overrides it."""
    from lacvit_dist.config import load_config
    from lacvit_dist.train.restart import stage_plan

    _, out, _ = restarts
    original = out / "run" / "stage1" / "timm"
    copied = tmp_path / "copied"
    shutil.copytree(out / "run", copied)
    recorded = json.loads((copied / "stage1" / "results.json").read_text())
    assert recorded["export"] == str(original)  # elsewhere, and present

    def cfg(*extra):
        return load_config(REPO / "configs" / "demo_digits.yaml", [
            f"data.root={digits_root}", f"run.output_dir={tmp_path}", "run.name=copied", *TINY, *extra])

    assert stage_plan(cfg(), "stage2", copied, {"stage1": recorded}) == {"backbone": str(copied / "stage1" / "timm")}
    moved = tmp_path / "moved"
    copied.rename(moved)  # what the copy's own results.json would record no longer exists
    gone = {"stage1": {**recorded, "export": str(copied / "stage1" / "timm")}}
    assert stage_plan(cfg(), "stage2", moved, gone) == {"backbone": str(moved / "stage1" / "timm")}
    explicit = cfg(f"stage2.backbone_path={original}")
    assert stage_plan(explicit, "stage2", moved, gone) == {"backbone": str(original)}


def test_a_checkpoint_one_rank_cannot_see_stops_every_rank(restarts):
    per_rank, _, _ = restarts
    for got in per_rank:
        error = got["load_where_rank1_lacks_it"]["error"]
        assert error.startswith("CheckpointError: checkpoint folder ") and "rank 1: does not exist" in error
        assert "rank 0" not in error
