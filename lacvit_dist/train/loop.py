"""The one training loop: a DeepSpeed engine around an objective's model, fed by the WebDataset stream, with
resume, preemption, non-finite guard, evaluation on whole splits, logging and the stage's export.

Stage 1, stage 2 and the CE baseline all run through `train_stage`; they differ only in the Objective.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch

from lacvit_dist import distributed as dist_utils
from lacvit_dist.io import write_json
from lacvit_dist.train.checkpoint import find_latest_everywhere, gather_rng_states, load_training_checkpoint, save_training_checkpoint, set_rng_state, tag_for_step
from lacvit_dist.train.restart import changed_settings
from lacvit_dist.config import Config, ConfigError, check_batch_arithmetic, to_dict
from lacvit_dist.data.pipeline import BAD_SAMPLE_KINDS, StreamPosition, eval_loader, finite_epoch_plan, train_loader
from lacvit_dist.data.shards import DatasetInfo
from lacvit_dist.data.transforms import evaluation
from lacvit_dist.evaluation.passes import at_least_one, evaluate_classifier, evaluate_embeddings, lockstep, skipped_in_bank
from lacvit_dist.models.export import EXPORT_DIR, export_timm
from lacvit_dist.models.factory import ContrastiveModel
from lacvit_dist.models.memory import count_parameters, estimate_memory, format_memory_estimate
from lacvit_dist.train.nonfinite import NonFiniteGuard
from lacvit_dist.train.preemption import REQUEUE_EXIT_CODE, StopCheck, StopSignal
from lacvit_dist.train.objectives import VIEWS, Objective, engine_dtype
from lacvit_dist.log import PRTally, TensorBoard, format_duration, log


from lacvit_dist.train.engine import build_optimizer, gradient_dtypes, initialize_engine


def _full_state_dict(engine, module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Complete state dict on rank 0 (None elsewhere); under ZeRO-3 every rank joins the gather."""
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if engine.global_rank == 0 else None
        return state
    return module.state_dict() if engine.global_rank == 0 else None


def train_stage(cfg: Config, objective: Objective, info: DatasetInfo, stage_dir: Path) -> dict[str, Any]:
    """Train `objective` for its configured epochs, evaluate it honestly, save and export; returns its results."""
    started = time.time()
    stage = cfg.stage(objective.name)
    world = dist_utils.world_size()
    rank = dist_utils.rank()
    train_split = info.split(cfg.data.train_split)
    steps_per_epoch = check_batch_arithmetic(objective.name, stage, world, train_split.num_samples)
    class_aware_m = cfg.data.class_aware_m if objective.name == "stage1" else 0  # partners matter to the contrast only
    if cfg.data.epoch_mode == "finite":  # the shards define the epoch: the batches every rank gets from them
        steps_per_epoch = finite_epoch_plan(
            train_split, world, cfg.data.num_workers, stage.micro_batch_size, accumulation=stage.grad_accum_steps,
            group_size=class_aware_m + 1, num_classes=info.num_classes).batches_per_rank // stage.grad_accum_steps
    total_steps = steps_per_epoch * stage.epochs
    global_batch = stage.micro_batch_size * stage.grad_accum_steps * world

    optimizer, scheduler = build_optimizer(objective.model, stage, total_steps)
    engine = initialize_engine(cfg, stage, objective.model, optimizer, scheduler, world)
    device = engine.device
    trainable = count_parameters(engine.module, trainable_only=True)
    terms = objective.contrast_terms(stage.micro_batch_size, stage.grad_accum_steps, world)
    log.info("%s: world %d, micro batch %d x accum %d -> global batch %d images%s; %d steps/epoch x %d epochs; "
             "%s, ZeRO %d, %.2fM trainable params, image size %d", objective.name, world, stage.micro_batch_size,
             stage.grad_accum_steps, global_batch,
             f", {terms} contrast terms per anchor" if terms is not None else "", steps_per_epoch, stage.epochs,
             cfg.deepspeed.precision, cfg.deepspeed.zero_stage, trainable / 1e6, objective.stats.img_size)
    log.info("%s: %s", objective.name, gradient_dtypes(engine))
    if objective.name == "stage1":  # the full backbone + head train only here; stage 2 trains a linear head
        log.info("%s: %s", objective.name, format_memory_estimate(estimate_memory(
            cfg.model, stage.micro_batch_size, VIEWS, cfg.deepspeed.precision, cfg.deepspeed.zero_stage, world,
            optimizer=stage.optimizer.name, accumulation_steps=stage.grad_accum_steps,
            enlarge_contrast=cfg.stage1.accumulation == "enlarge_contrast")))

    torch.manual_seed(cfg.run.seed * 1000 + rank + 1)  # per-rank RNG; the model was initialised before this
    ckpt_dir = stage_dir / "checkpoints"
    guard = NonFiniteGuard(cfg.run.max_nonfinite_steps)
    data_position = {"world_size": world, "num_workers": cfg.data.num_workers, "seed": cfg.run.seed,
                     "micro_batch_size": stage.micro_batch_size, "grad_accum_steps": stage.grad_accum_steps,
                     "shuffle_buffer": cfg.data.shuffle_buffer, "shards": [Path(f).name for f in train_split.filenames],
                     "epoch_mode": cfg.data.epoch_mode, "class_aware_m": class_aware_m}
    step, history, elapsed_before, bad_before = 0, [], 0.0, dict.fromkeys(BAD_SAMPLE_KINDS, 0)
    # Where each of this rank's data streams stood at the checkpoint (role -> position of the last of its
    # batches trained on; none in a checkpoint from before positions were kept).
    resume_positions: dict[int, StreamPosition] = {}
    pending_eval = None  # the epoch whose evaluation a stop came before: run first on resume
    rng = None  # this rank's RNG state at the checkpoint
    tag = find_latest_everywhere(ckpt_dir)
    if tag is not None:
        state = load_training_checkpoint(engine, ckpt_dir, tag)
        _check_resumable(state, data_position, ckpt_dir / tag)
        changed = changed_settings(state["config"], cfg, objective.name) if "config" in state else []
        if changed:  # e.g. more epochs: the restored step count and LR schedule would belong to neither config
            raise ConfigError(f"run.name: checkpoint {ckpt_dir / tag} was saved with other settings: "
                              f"{'; '.join(changed)} (saved -> now). Restore them to resume, or start a new run.name")
        step, history, elapsed_before = state["step"], state["history"], state["elapsed_s"]
        bad_before = state.get("bad_samples", bad_before)
        if "stream_positions" in state:
            resume_positions = {int(role): StreamPosition(*position)
                                for role, position in state["stream_positions"][rank].items()}
        pending_eval = state.get("pending_eval")
        guard.load_state_dict(state["nonfinite"])
        rng = state["rng"][rank]
        log.info("%s: resumed from %s at step %d/%d", objective.name, ckpt_dir / tag, step, total_steps)

    def save(pending_eval: int | None = None) -> None:  # collective: every rank writes its share
        client_state = {"step": step, "history": history, "elapsed_s": elapsed_before + time.time() - started,
                        "nonfinite": guard.state_dict(), "rng": gather_rng_states(), "data": data_position,
                        "stream_positions": dist_utils.gather_objects({r: tuple(p) for r, p in positions.items()}),
                        "pending_eval": pending_eval,
                        "bad_samples": {k.removeprefix("bad_samples/"): int(v) for k, v in
                                        _bad_sample_totals(bad_per_stream, bad_before).items()},
                        "stage": objective.name, "config": to_dict(cfg)}
        save_training_checkpoint(engine, ckpt_dir, step, client_state, keep_last=cfg.run.keep_checkpoints)

    # The stream continues exactly where the checkpointed run stopped (same samples, same augmentations).
    batches = train_loader(train_split, info.num_classes, objective.train_transform(), stage.micro_batch_size,
                           seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                           shuffle_buffer=cfg.data.shuffle_buffer, start_batch=step * stage.grad_accum_steps,
                           skip_bad_samples=cfg.data.on_bad_sample == "skip", epoch_mode=cfg.data.epoch_mode,
                           class_aware_m=class_aware_m, accumulation=stage.grad_accum_steps, rank=rank,
                           world_size=world, positions=resume_positions)
    positions = dict(resume_positions)  # kept up to date with every batch trained on
    bad_per_stream: dict[int, dict[str, int]] = {}  # latest tally of each data stream since this (re)start
    tb = TensorBoard(stage_dir / "tb" if rank == 0 and cfg.logging.tensorboard else None, objective.name)
    evaluate = _Evaluator(cfg, objective, engine, info, tb)

    window_start, window_steps, saved_at = time.time(), 0, step
    running: dict[str, torch.Tensor] = {}
    objective.set_train_mode(engine.module)
    if pending_eval is not None:  # the interrupted run stopped right before this evaluation
        evaluate(cfg.data.val_split, step, pending_eval)
    if rng is not None:  # restored last: setting up the loader draws from the RNG (its workers' base seed)
        set_rng_state(rng)
    with StopSignal() as stop:
        stop_check = StopCheck(stop, cfg.run.stop_check_every_steps, cfg.run.stop_check_every_s, step, device)
        while step < total_steps:
            micro_batches = []
            for _ in range(stage.grad_accum_steps):
                batch = next(batches)
                positions[batch.stream.role] = batch.stream.position
                bad_per_stream[batch.stream.role] = batch.stream.bad_samples
                micro_batches.append((batch.images, batch.labels))  # moved to the device when used
            skipped_before = guard.skipped
            metrics = objective.train_step(engine, micro_batches, guard)
            if guard.skipped == skipped_before:  # a skipped step's metrics are NaN: keep them out of the means
                # Accumulate on device; read back only when logging (no host sync per step).
                for key, value in metrics.items():
                    running[key] = running.get(key, 0) + value
                window_steps += 1
            step += 1
            epoch, epoch_end = (step - 1) // steps_per_epoch + 1, step % steps_per_epoch == 0
            if (step % stage.log_every_steps == 0 or step == total_steps) and window_steps:
                elapsed = time.time() - window_start
                values = {k: (dist_utils.all_reduce_sum(v) / (world * window_steps)).item()
                          for k, v in running.items()}
                values.update(lr=engine.get_lr()[0], images_per_s=global_batch * window_steps / elapsed,
                              nonfinite_skipped=guard.skipped, **_bad_sample_totals(bad_per_stream, bad_before))
                tb.scalars(values, step)
                history.append({"step": step, "epoch": epoch, **values})
                shown = {k: v for k, v in values.items() if not k.startswith("bad_samples/")}
                shown["bad_samples"] = sum(v for k, v in values.items() if k.startswith("bad_samples/"))
                log.info("%s epoch %d step %d/%d  %s  images/s/gpu %.4g  eta %s", objective.name, epoch, step,
                         total_steps, "  ".join(f"{k} {v:.4g}" for k, v in shown.items()),
                         values["images_per_s"] / world, format_duration((total_steps - step) * elapsed / window_steps))
                running, window_start, window_steps = {}, time.time(), 0
            evaluating = (epoch_end and epoch % stage.eval_every_epochs == 0 and step < total_steps
                          and cfg.data.val_split is not None)
            # Every rank learns of a signal any rank got and they stop together: before an evaluation (it may
            # be slow), after it, at epoch ends, at the last step, and every few steps or seconds in between
            # (StopCheck: one all-reduce, at the same steps on every rank, kept off most steps' hot path).
            stopping = evaluating and stop_check.agree(step)
            if evaluating and not stopping:
                evaluate(cfg.data.val_split, step, epoch)
            every = cfg.run.checkpoint_every_steps
            if step < total_steps and (epoch_end or (every and step % every == 0)):
                save(pending_eval=epoch if stopping else None)  # stopping already: it came before the evaluation
                saved_at = step
            if not stopping and (epoch_end or step == total_steps or stop_check.due(step)):
                stopping = stop_check.agree(step)
            if stopping:
                if saved_at != step:
                    save()
                log.warning("%s: stop requested (%s); checkpoint at step %d saved, exiting with code %d for a "
                            "requeue", objective.name, stop.received.name if stop.received else "signal on another rank",
                            step, REQUEUE_EXIT_CODE)
                raise StopRequested(step)

    results: dict[str, Any] = {"stage": objective.name, "steps": step, "epochs": stage.epochs,
                               "global_batch": global_batch, "world_size": world, "contrast_terms": terms,
                               "nonfinite_skipped": guard.skipped, "train_log": history}
    # The model evaluated is the last one: nothing is selected on validation or test data. Stage 1 never
    # touches the test split (its monitor uses train + val); the classifiers report it once, at the end.
    results["val_split"] = cfg.data.val_split  # null: run without a val split, so no "val" results
    if cfg.data.val_split is not None:
        results["val"] = evaluate(cfg.data.val_split, step, stage.epochs, images=True)
    if objective.classifies:
        results["test"] = evaluate(cfg.data.test_split, step, stage.epochs, images=True)
    # Samples the training stream skipped, per kind, over all ranks and restarts (a collective).
    results["bad_samples"] = {k.removeprefix("bad_samples/"): int(v)
                              for k, v in _bad_sample_totals(bad_per_stream, bad_before).items()}
    tb.hparams(_hparams(cfg, objective.name, global_batch, world), {
        **{f"val_{k}": v for k, v in results.get("val", {}).items()},
        **{f"test_{k}": v for k, v in results.get("test", {}).items()}})
    if saved_at != step:
        save()
    results["export"] = str(_export(cfg, objective, engine, stage_dir, step, info.class_names))
    results["wall_time_s"] = elapsed_before + time.time() - started
    if rank == 0:
        write_json(stage_dir / "results.json", results)
    tb.close()
    dist_utils.barrier()
    del engine, optimizer, batches
    gc.collect()
    return results


def _hparams(cfg: Config, stage_name: str, global_batch: int, world: int) -> dict[str, Any]:
    stage = cfg.stage(stage_name)
    hparams = {"model": cfg.model.name, "global_pool": cfg.model.global_pool, "global_batch": global_batch,
               "world_size": world, "epochs": stage.epochs, "optimizer": stage.optimizer.name,
               "lr": stage.optimizer.lr, "weight_decay": stage.optimizer.weight_decay,
               "precision": cfg.deepspeed.precision, "zero_stage": cfg.deepspeed.zero_stage, "seed": cfg.run.seed}
    if stage_name == "stage1":
        hparams.update(temperature=cfg.stage1.temperature, accumulation=cfg.stage1.accumulation)
    return hparams


def _bad_sample_totals(per_stream: dict[int, dict[str, int]], before: dict[str, int]) -> dict[str, float]:
    """Skipped samples per kind over all ranks and streams, including those counted before a resume.
    A collective (one small all-reduce): every rank calls it at the same step."""
    local = torch.tensor([sum(counts.get(kind, 0) for counts in per_stream.values()) for kind in BAD_SAMPLE_KINDS],
                         dtype=torch.float64)
    totals = dist_utils.all_reduce_sum(local.to(dist_utils.collective_device())).tolist()
    return {f"bad_samples/{kind}": before.get(kind, 0) + total for kind, total in zip(BAD_SAMPLE_KINDS, totals)}


class StopRequested(Exception):
    """A signal asked the job to stop; every rank saved a checkpoint at `step`. Exit for a requeue."""


_DATA_POSITION_DEFAULTS = {"epoch_mode": "resampled", "class_aware_m": 0}


def _check_resumable(state: dict[str, Any], data_position: dict[str, Any], where: Path) -> None:
    """A checkpoint resumes only a run that would consume the same data stream in the same way."""
    # Checkpoints from before a key existed were written with its default.
    saved = {**_DATA_POSITION_DEFAULTS, **state.get("data", {})}
    changed = {k: (saved.get(k), v) for k, v in data_position.items() if saved.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"run.name: checkpoint {where} cannot be resumed with these settings ({details}); "
                          f"restore them or start a new run.name")


class _Evaluator:
    """Evaluates the objective on a whole split: classifiers by accuracy, stage 1 by its kNN / health monitor."""

    def __init__(self, cfg: Config, objective: Objective, engine, info: DatasetInfo, tb: TensorBoard):
        self.cfg, self.objective, self.engine, self.info, self.tb = cfg, objective, engine, info, tb
        self.transform = evaluation(objective.stats)
        self.batch_size = cfg.stage(objective.name).micro_batch_size
        self.history: list[dict[str, float]] = []  # stage 1's monitor at every evaluation, for its figure

    def _loader(self, split_name: str, skip_bad_samples: bool = False):
        """(the pass, its batches): the pass reports what it skipped; every rank runs at least one batch (under
        ZeRO-3 all ranks run as many)."""
        loader = eval_loader(self.info.split(split_name), self.info.num_classes, self.transform, self.batch_size,
                             rank=dist_utils.rank(), world_size=dist_utils.world_size(),
                             num_workers=self.cfg.data.num_workers, skip_bad_samples=skip_bad_samples)
        size = self.objective.stats.img_size
        empty = lambda: (torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long), [])  # noqa: E731
        return loader, (at_least_one if self.cfg.deepspeed.zero_stage < 3 else lockstep)(loader, empty)

    def __call__(self, split_name: str, step: int, epoch: int, images: bool = False) -> dict[str, Any]:
        # Evaluation draws from the global RNG (each DataLoader's base seed): on a fork of it, so that training
        # goes on with the same random stream whether it evaluated or not (a run resumed from before an
        # evaluation, or one evaluating more often, trains exactly as the uninterrupted one).
        device = self.engine.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return self._evaluate(split_name, step, epoch, images)

    def _evaluate(self, split_name: str, step: int, epoch: int, images: bool) -> dict[str, Any]:
        engine, objective, where = self.engine, self.objective, f"split {split_name!r} of {self.info.root}"
        device, dtype = engine.device, engine_dtype(engine)
        if objective.classifies:
            pr = PRTally(self.info.num_classes) if images and self.cfg.logging.tensorboard else None
            batches = self._loader(split_name)[1]
            metrics = evaluate_classifier(engine.module, pr.tap(engine.module, batches) if pr else batches, device,
                                          dtype, self.info.num_classes, self.info.split(split_name).num_samples, where)
            log.info("%s epoch %d %s top1 %.4f top5 %.4f (%d samples)", objective.name, epoch, split_name,
                     metrics["top1"], metrics["top5"], metrics["samples"])
            if pr is not None:  # figures on rank 0 only (a no-op elsewhere); the PR counts are summed by all
                self.tb.classifier_figures(metrics, self.info.class_names, pr.histograms(), step, split_name)
        else:
            engine.module.eval()
            # The bank is the train split: read as training reads it (data.on_bad_sample), every sample of it
            # embedded or skipped and counted; val stays strict.
            train = self.info.split(self.cfg.data.train_split)
            bank, bank_batches = self._loader(train.name, skip_bad_samples=self.cfg.data.on_bad_sample == "skip")
            bank_where = f"split {train.name!r} of {self.info.root} (kNN bank)"
            metrics, embeddings = evaluate_embeddings(
                objective.encode(engine.module), bank_batches, self._loader(split_name)[1], device, dtype,
                self.info.num_classes, (None, self.info.split(split_name).num_samples), where, bank_where=bank_where)
            skipped = skipped_in_bank(bank.skipped, metrics["bank_samples"], train.num_samples, bank_where)
            metrics.update({f"bank_bad_samples/{kind}": count for kind, count in skipped.items()})
            log.info("%s epoch %d %s kNN top1 %.4f, backbone isotropy %.3f, effective rank %.1f", objective.name,
                     epoch, split_name, metrics["knn_top1"], metrics["backbone/isotropy"],
                     metrics["backbone/effective_rank"])
            self.history.append({"step": step, **metrics})
            if images:  # a labelled sample for TensorBoard's projector and the figures (no-ops off rank 0)
                sample, labels = embeddings["backbone"][:2000], embeddings["labels"][:2000].tolist()
                self.tb.embedding("backbone", sample.cpu(), [self.info.class_names[i] for i in labels], step,
                                  split_name)
                self.tb.embedding_figures(embeddings, self.info.class_names, self.history, step, split_name)
        objective.set_train_mode(engine.module)
        self.tb.scalars(metrics, step, group=split_name)
        return metrics


def _export(cfg: Config, objective: Objective, engine, stage_dir: Path, step: int, class_names: list[str]) -> Path:
    """The stage's one output, in timm's own format (lacvit_dist.models.export): stage 1 the backbone alone (the
    input of stage 2), the others the whole timm classifier."""
    module = engine.module.backbone if isinstance(engine.module, ContrastiveModel) else engine.module
    state = _full_state_dict(engine, module, cfg.deepspeed.zero_stage)
    folder = stage_dir / EXPORT_DIR
    if state is not None:
        export_timm(module, state, folder, stats=objective.stats, class_names=class_names, manifest={
            "stage": objective.name, "step": step, "source_checkpoint": str(stage_dir / "checkpoints" / tag_for_step(step)),
            "config": to_dict(cfg)})
    dist_utils.barrier()
    return folder
