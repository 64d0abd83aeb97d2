"""Contrast-enlarging gradient accumulation under the DeepSpeed engine: k micro-batches per optimizer step give
the same update as one k-times larger micro-batch (the contrast set is the whole accumulated global batch);
plain accumulation does not (its contrast set is one micro-batch), which shows the test can tell them apart.
With stochastic depth and dropout, the update equals the gradient of the global loss on the concatenated
projections under the same masks: the reference runs one big micro-batch whose forward goes through the k
chunks in order, drawing exactly the masks the feature cache's no-grad pass draws."""
import numpy as np
import pytest
from dist_helpers import run_in_processes

TINY = ["model.name=vit_tiny_patch16_224", "model.overrides.img_size=16", "model.overrides.patch_size=4",
        "model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2", "model.proj_dim=16",
        "stage1.optimizer.name=sgd", "stage1.optimizer.lr=0.1", "stage1.optimizer.momentum=0.0",
        "stage1.optimizer.weight_decay=0.0", "deepspeed.gradient_clipping=0.0", "run.device=cpu"]
IMAGES_PER_RANK = 8


def _optimizer_steps(rank, world_size, runs):
    from lacvit_dist.distributed import detect_world, init_distributed

    init_distributed(detect_world(), "gloo")  # hands the helper's process group to DeepSpeed
    return [_one_optimizer_step(rank, world_size, *run) for run in runs]


STOCHASTIC = ["model.drop_path_rate=0.3", "model.overrides.proj_drop_rate=0.1"]


def _one_optimizer_step(rank, world_size, accumulation, accum, zero_stage, stochastic=False, chunks=1):
    import deepspeed
    import torch

    from lacvit_dist.config import load_config
    from lacvit_dist.train.engine import build_optimizer, deepspeed_config
    from lacvit_dist.train.nonfinite import NonFiniteGuard
    from lacvit_dist.train.objectives import SupConObjective

    micro = IMAGES_PER_RANK // accum
    cfg = load_config(None, TINY + (STOCHASTIC if stochastic else []) + [
        f"stage1.grad_accum_steps={accum}", f"stage1.micro_batch_size={micro}",
        f"stage1.accumulation={accumulation}", f"deepspeed.zero_stage={zero_stage}"])
    torch.manual_seed(0)
    task = SupConObjective(cfg, num_classes=3)
    optimizer, scheduler = build_optimizer(task.model, cfg.stage1, total_steps=1)
    engine, *_ = deepspeed.initialize(model=task.model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, cfg.stage1, world_size), dist_init_required=False)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own images, the same in every run
    views = torch.randn(IMAGES_PER_RANK, 2, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 3, (IMAGES_PER_RANK,), generator=gen)
    def params():  # ZeRO-3 partitions parameters: gather them to read them whole
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}

    before = params()
    if chunks > 1:  # the reference: one micro-batch, its forward in chunks (each draws its own masks in turn)
        loss, metrics = task.criterion(torch.cat([engine(chunk) for chunk in views.chunk(chunks)]), labels)
        engine.backward(loss)
        engine.step()
    else:
        metrics = task.train_step(engine, [(views[i * micro:(i + 1) * micro], labels[i * micro:(i + 1) * micro])
                                           for i in range(accum)], NonFiniteGuard(1))
    assert engine.global_steps == 1  # exactly one optimizer step was taken
    update = {n: (before[n] - p).numpy() for n, p in params().items()}
    from lacvit_dist.models.memory import count_parameters

    return (update, float(metrics["loss"]), task.contrast_terms(micro, accum, world_size),
            count_parameters(engine.module, trainable_only=True))


def _max_rel_diff(a, b):
    return max(np.abs(a[k] - b[k]).max() / (np.abs(b[k]).max() + 1e-12) for k in b)


@pytest.fixture(scope="module")
def updates():
    """{(accumulation, accum, zero_stage): per-rank (update, loss, contrast terms)}, one 2-process job."""
    runs = [(mode, accum, zero) for zero in (0, 2, 3)
            for mode, accum in (("enlarge_contrast", 1), ("enlarge_contrast", 4), ("plain", 4))]
    runs += [("enlarge_contrast", accum, zero, True, chunks) for zero in (0, 2, 3)
             for accum, chunks in ((1, 4), (4, 1))]
    per_rank = run_in_processes(_optimizer_steps, 2, runs, timeout=300)
    return {run: [per_rank[r][i] for r in range(2)] for i, run in enumerate(runs)}


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_enlarged_accumulation_equals_one_big_batch(updates, zero_stage):
    big_update, big_loss, big_terms, _ = updates["enlarge_contrast", 1, zero_stage][0]
    enlarged = updates["enlarge_contrast", 4, zero_stage]
    for rank in range(2):  # data parallel: every rank holds the same parameters after the step
        assert _max_rel_diff(enlarged[rank][0], big_update) < 1e-4
    assert enlarged[0][1] == pytest.approx(big_loss, rel=1e-5)
    assert enlarged[0][2] == big_terms == 2 * 8 * 2 - 1


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_plain_accumulation_contrasts_one_micro_batch(updates, zero_stage):
    big_update = updates["enlarge_contrast", 1, zero_stage][0][0]
    plain_update, _, plain_terms, _ = updates["plain", 4, zero_stage][0]
    assert plain_terms == 2 * 2 * 2 - 1
    assert _max_rel_diff(plain_update, big_update) > 1e-2


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_enlarged_accumulation_is_exact_with_stochastic_depth_and_dropout(updates, zero_stage):
    reference, reference_loss, *_ = updates["enlarge_contrast", 1, zero_stage, True, 4][0]
    enlarged = updates["enlarge_contrast", 4, zero_stage, True, 1]
    for rank in range(2):
        assert _max_rel_diff(enlarged[rank][0], reference) < 1e-4
    assert enlarged[0][1] == pytest.approx(reference_loss, rel=1e-5)
    # The masks matter: without them the update is that of another function (drop-path 0.3 on 1 block).
    assert _max_rel_diff(updates["enlarge_contrast", 1, zero_stage][0][0], reference) > 1e-2


def test_trainable_parameters_counted_under_every_zero_stage(updates):
    counts = {zero: updates["enlarge_contrast", 1, zero][0][3] for zero in (0, 2, 3)}
    assert counts[0] > 0 and counts[2] == counts[0] and counts[3] == counts[0]  # ZeRO-3 used to print 0


def test_zero_stages_agree(updates):
    assert _max_rel_diff(updates["enlarge_contrast", 4, 2][0][0], updates["enlarge_contrast", 4, 0][0][0]) < 1e-4
